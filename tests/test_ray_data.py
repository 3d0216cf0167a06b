"""Bulk rewriting on a real local Ray instance (2 CPUs): the same rows as the local path, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray  # the test extra installs Ray Data; only the vLLM path below needs what cannot be installed here

PROMPTS = ["Tell me about dogs", "Question 1?", "", "Write a haiku about rain", "Who owns it?", "Explain tides", "List three fruits"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_rewrite_dataset_matches_the_local_rewriter(local_ray, tiny_bpo_dir: Path, tiny_rewriter):
    from bpo_plugins.ray_data import rewrite_dataset

    items = [{"prompt": p, "context": "Ctx kept." if i == 4 else ""} for i, p in enumerate(PROMPTS)]
    source = ray.data.from_items(items)
    rewritten = rewrite_dataset(source, model=str(tiny_bpo_dir), max_new_tokens=8, actors=2, rows_per_call=3)
    # Order is kept by the returned dataset's own context, not by flipping Ray's process-wide setting.
    assert rewritten.context.execution_options.preserve_order
    assert not source.context.execution_options.preserve_order
    assert not ray.data.DataContext.get_current().execution_options.preserve_order
    rows = rewritten.take_all()
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


class EngineStandIn:
    """What Ray Data's vLLM stage does to a row (vLLM needs a GPU): generate from "prompt" with
    "sampling_params" into "generated_text", here with the same weights on transformers."""

    def __init__(self, folder: str) -> None:
        from bpo_plugins.backends.transformers import TransformersBackend

        self.backend = TransformersBackend.load(folder, device="cpu")

    def __call__(self, row: dict) -> dict:
        from bpo_plugins.decoding import Decoding

        params = row["sampling_params"]
        assert params["temperature"] == 0.0  # greedy
        output = self.backend.generate_texts([row["prompt"]], Decoding(max_new_tokens=params["max_tokens"]), None, True)
        return {**row, "generated_text": output.generations[0].texts[0]}


def test_vllm_path_rows_match_the_local_rewriter(local_ray, tiny_bpo_dir: Path, tiny_rewriter):
    """The preprocess and postprocess around Ray's vLLM stage: BPO's raw template in, the core's checks out."""
    from bpo_plugins.ray_data import VLLMRows

    rows = VLLMRows(str(tiny_bpo_dir), template="bpo", max_new_tokens=8)
    items = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    ds = ray.data.from_items(items).map(rows.preprocess).map(EngineStandIn, fn_constructor_args=(str(tiny_bpo_dir),), concurrency=1)
    out = sorted(ds.map(rows.postprocess).take_all(), key=lambda r: r["id"])
    assert [r["prompt"] for r in out] == PROMPTS and set(out[0]) == {"prompt", "id", "rewritten", "fallback", "detail"}
    local = [tiny_rewriter.rewrite(p) for p in PROMPTS]
    assert [(r["rewritten"], r["fallback"]) for r in out] == [(x.rewritten, x.fallback and x.fallback.value) for x in local]
    assert out[2]["fallback"] == "empty_input"
    request = rows.preprocess({"prompt": "Explain tides"})
    assert request["prompt"].startswith("[INST] You are an expert prompt engineer") and request["prompt"].endswith("Explain tides [/INST]")
    with pytest.raises(ValueError, match="greedy and stable"):
        VLLMRows(str(tiny_bpo_dir), mode="aggressive")


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="vLLM is GPU-only and not installed here")
def test_rewrite_dataset_vllm_on_a_gpu_worker(local_ray, tiny_bpo_dir: Path, tiny_rewriter):
    from bpo_plugins.ray_data import rewrite_dataset_vllm

    out = rewrite_dataset_vllm(ray.data.from_items([{"prompt": p} for p in PROMPTS]), model_source=str(tiny_bpo_dir),
                               template="bpo", max_new_tokens=8).take_all()
    assert sorted(r["prompt"] for r in out) == sorted(PROMPTS) and all("fallback" in r for r in out)
