"""export/: a tiny Llama through optimum-onnx and onnxruntime, parity, the ONNX backend, bad folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("optimum.onnxruntime")

from bpo_plugins import FallbackReason, ModelLoadError, Rewriter
from bpo_plugins.export.onnx import MANIFEST, ParityError, export_onnx


@pytest.fixture(scope="module")
def onnx_fp32(tiny_bpo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    manifest = export_onnx(str(tiny_bpo_dir), out, "fp32")
    assert manifest.parity["passed"] and manifest.parity["greedy_exact_match"] == 1.0
    assert manifest.parity["max_abs_logit_diff"] <= 1e-3
    return out


def test_export_folder_is_self_contained(onnx_fp32, tiny_bpo_dir):
    manifest = json.loads((onnx_fp32 / MANIFEST).read_text())
    assert manifest["source"] == str(tiny_bpo_dir) and manifest["precision"] == "fp32" and manifest["size_mb"] > 0
    assert manifest["template"]["raw"] == "[INST] {user} [/INST]"  # BPO checkpoint: BPO template travels along
    assert (onnx_fp32 / "model.onnx").is_file() and (onnx_fp32 / "tokenizer.json").is_file() and (onnx_fp32 / "config.json").is_file()


def test_onnx_backend_is_picked_and_matches_transformers(onnx_fp32, tiny_bpo_dir):
    prompts = ["Explain gravity", "Tell me about cats, please", "Write a haiku"]
    onnx = Rewriter.from_pretrained(onnx_fp32, max_new_tokens=6)
    reference = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=6)
    results = onnx.rewrite_batch(prompts)
    assert onnx.backend.name == "onnx" and onnx.template.name == "bpo"
    assert [r.candidates for r in results] == [r.candidates for r in reference.rewrite_batch(prompts)]


def test_onnx_backend_passes_core_guards(onnx_fp32):
    rewriter = Rewriter.from_pretrained(onnx_fp32, max_new_tokens=2000, max_input_words=5000, timeout_s=0.05)
    assert rewriter.rewrite("Describe " + "the moon " * 300).fallback is FallbackReason.TIMEOUT
    plain = Rewriter.from_pretrained(onnx_fp32, max_new_tokens=6)
    assert plain.rewrite("  ").fallback is FallbackReason.EMPTY_INPUT
    assert plain.rewrite("word " * 600).fallback is FallbackReason.INPUT_TOO_LONG
    result = plain.rewrite("Tell me about cats")  # random weights: garbage out, original passed on
    assert result.fallback is not None and result.rewritten == "Tell me about cats"
    assert len(plain.rewrite("Tell me about dogs", mode="aggressive").candidates) == 5
    with pytest.raises(TypeError):
        plain.rewrite(b"bytes")


def test_int8_export_and_failed_parity_is_loud(tiny_bpo_dir, tmp_path):
    manifest = export_onnx(str(tiny_bpo_dir), tmp_path / "int8", "int8")
    assert manifest.precision == "int8" and manifest.parity["token_agreement"] >= 0.5
    # 4-bit weights cannot hold logits to 1e-6: held to that bar, the export must refuse and leave nothing.
    with pytest.raises(ParityError, match="failed parity"):
        export_onnx(str(tiny_bpo_dir), tmp_path / "int4", "int4", logit_atol=1e-6)
    assert not (tmp_path / "int4").exists()


def test_corrupted_or_mismatched_folders_give_clear_errors(onnx_fp32, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_fp32, broken)
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupted"):
        Rewriter.from_pretrained(broken, backend="onnx").warmup()
    missing = tmp_path / "missing"
    shutil.copytree(onnx_fp32, missing)
    (missing / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        Rewriter.from_pretrained(missing).warmup()
    garbage = tmp_path / "garbage"
    shutil.copytree(onnx_fp32, garbage)
    (garbage / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ModelLoadError, match="cannot load the ONNX export"):
        Rewriter.from_pretrained(garbage).warmup()
    with pytest.raises(ModelLoadError, match="not a bpo export"):
        Rewriter.from_pretrained(tmp_path, backend="onnx").warmup()


def test_gpu_paths_skip_cleanly_without_a_gpu(onnx_fp32):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU is present: the CUDA path is exercised by benchmarks/gpu instead")
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        Rewriter.from_pretrained(onnx_fp32, backend="onnx", device="cuda").warmup()
    assert Rewriter.from_pretrained(onnx_fp32).backend.model.providers[0] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="fp16 export needs --device cuda"):
        export_onnx("unused", Path("unused"), "fp16", "cpu")


def test_export_cli(tiny_bpo_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "bpo_plugins", "export", "onnx", "--model", str(tiny_bpo_dir), "--out",
                          str(tmp_path / "cli"), "--precision", "fp32"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["parity"]["passed"] is True
    bad = subprocess.run([sys.executable, "-m", "bpo_plugins", "export", "onnx", "--model", str(tiny_bpo_dir), "--out",
                          str(tmp_path / "x"), "--precision", "int3"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown precision" in bad.stderr and "Traceback" not in bad.stderr
