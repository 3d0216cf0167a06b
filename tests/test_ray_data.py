"""Bulk rewriting on a real local Ray instance (2 CPUs): the same rows as the local path, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

PROMPTS = ["Tell me about dogs", "Question 1?", "", "Write a haiku about rain", "Who owns it?", "Explain tides", "List three fruits"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_rewrite_dataset_matches_the_local_rewriter(local_ray, tiny_bpo_dir: Path, tiny_rewriter):
    from bpo_plugins.ray_data import rewrite_dataset

    items = [{"prompt": p, "context": "Ctx kept." if i == 4 else ""} for i, p in enumerate(PROMPTS)]
    rows = rewrite_dataset(ray.data.from_items(items), model=str(tiny_bpo_dir), max_new_tokens=8, actors=2, rows_per_call=3).take_all()
    local = tiny_rewriter.rewrite_batch(PROMPTS, contexts=[i["context"] or None for i in items])
    assert [r["prompt"] for r in rows] == PROMPTS  # order kept
    assert [(r["rewritten"], r["fallback"]) for r in rows] == [(x.rewritten, x.fallback and x.fallback.value) for x in local]
    assert rows[2]["fallback"] == "empty_input"  # a bad row is a row with its reason, not a failed job


def test_cli_ray_run_matches_local_output_and_resumes(tiny_bpo_dir: Path, tmp_path: Path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bpo_plugins", "optimize", "--file", str(source), "--out", str(out),
                               "--model", str(tiny_bpo_dir), "--max-new-tokens", "8", *extra], capture_output=True, text=True, timeout=600)

    local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert run(local).returncode == 0
    # An interrupted Ray run: three rows written, the fourth torn.
    first = run(distributed, "--ray", "--actors", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    lines = distributed.read_text().splitlines()
    distributed.write_text("\n".join(lines[:3]) + "\n" + lines[3][:7])
    second = run(distributed, "--ray", "--actors", "1")
    assert second.returncode == 0, second.stderr[-2000:]
    assert distributed.read_text() == local.read_text()
    stats = json.loads(distributed.with_suffix(".stats.json").read_text())
    assert stats["engine"] == "ray" and stats["resumed_from"] == 3 and stats["rows"] == len(PROMPTS)
