"""export/: a tiny Llama through both engines (optimum-onnx, onnxruntime-genai's builder), parity, the
ONNX backends, bad folders. Every backend test runs once per engine."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# onnxruntime-genai is in [local]; optimum-onnx is the [onnx] extra (transformers 4.x), which .ci/run's onnx job
# installs in a venv of its own: there every engine runs, and in the main venv the optimum ones skip.
from bpo_plugins import FallbackReason, ModelLoadError, Rewriter
from bpo_plugins.export.onnx import export_onnx
from bpo_plugins.inputs import MANIFEST
from bpo_plugins.onnx_export import ParityError
from tests.conftest import prefix_reuse_runs

HAS_OPTIMUM = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.onnxruntime") is not None
ENGINES = [pytest.param("optimum", marks=pytest.mark.skipif(not HAS_OPTIMUM, reason="the [onnx] extra: .ci/run's onnx job")),
           "genai"]
BACKEND_NAME = {"optimum": "onnx", "genai": "onnx-genai"}


@pytest.fixture(scope="module", params=ENGINES)
def onnx_fp32(request, tiny_bpo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / f"fp32-{request.param}"
    manifest = export_onnx(str(tiny_bpo_dir), out, "fp32", engine=request.param)
    assert manifest.engine == request.param
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
    engine = json.loads((onnx_fp32 / MANIFEST).read_text())["engine"]
    assert onnx.backend.name == BACKEND_NAME[engine] and onnx.template.name == "bpo"
    assert [r.candidates for r in results] == [r.candidates for r in reference.rewrite_batch(prompts)]
    # A padded batch decodes exactly what each prompt decodes alone.
    assert [r.candidates for r in results] == [onnx.rewrite(p).candidates for p in prompts]


def test_onnx_backend_passes_core_guards(onnx_fp32):
    # Greedy random weights loop within a few tokens; with the loop guard on, a fast machine finishes
    # before the deadline. Off, the row decodes until timeout_s cuts it, on any machine.
    rewriter = Rewriter.from_pretrained(onnx_fp32, max_new_tokens=2000, max_input_words=5000, timeout_s=0.05,
                                        stop_loops=False, length_budget=False)
    assert rewriter.rewrite("Describe " + "the moon " * 300).fallback is FallbackReason.TIMEOUT
    plain = Rewriter.from_pretrained(onnx_fp32, max_new_tokens=6)
    assert plain.rewrite("  ").fallback is FallbackReason.EMPTY_INPUT
    assert plain.rewrite("word " * 600).fallback is FallbackReason.INPUT_TOO_LONG
    result = plain.rewrite("Tell me about cats")  # random weights: garbage out, original passed on
    assert result.fallback is not None and result.rewritten == "Tell me about cats"
    assert len(plain.rewrite("Tell me about dogs", mode="aggressive").candidates) == 5
    with pytest.raises(TypeError):
        plain.rewrite(b"bytes")


@pytest.mark.parametrize("engine", ENGINES)
def test_int8_export_and_failed_parity_is_loud(tiny_bpo_dir, tmp_path, engine):
    manifest = export_onnx(str(tiny_bpo_dir), tmp_path / "int8", "int8", engine=engine)
    assert manifest.precision == "int8" and manifest.parity["token_agreement"] >= 0.5 and manifest.block_size == 64
    # 4-bit weights cannot hold logits to 1e-6: held to that bar, the export must refuse and leave nothing.
    with pytest.raises(ParityError, match="failed parity"):
        export_onnx(str(tiny_bpo_dir), tmp_path / "int4", "int4", logit_atol=1e-6, engine=engine)
    assert not (tmp_path / "int4").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_int4_block_size_reaches_every_quantized_matmul(tiny_bpo_dir, tmp_path, engine):
    import onnx

    manifest = export_onnx(str(tiny_bpo_dir), tmp_path / "int4", "int4", engine=engine, block_size=16)
    graph = onnx.load(str(tmp_path / "int4" / manifest.onnx_file), load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert manifest.block_size == 16 and blocks == {16}
    with pytest.raises(ValueError, match="power of two"):
        export_onnx(str(tiny_bpo_dir), tmp_path / "bad", "int4", engine=engine, block_size=48)


def test_genai_batches_prompts_that_contain_its_pad_token(tiny_bpo_dir, tmp_path):
    """GenAI masks every occurrence of its pad id: prompts holding it must still decode as they do alone."""
    folder = tmp_path / "genai"
    export_onnx(str(tiny_bpo_dir), folder, "fp32", engine="genai", check=False)
    rewriter = Rewriter.from_pretrained(folder, max_new_tokens=5)
    pad = rewriter.backend.tokenizer.convert_ids_to_tokens(rewriter.backend.pad_token_id)
    prompts = [f"Explain {pad} gravity", "Write a haiku"]
    assert [r.candidates for r in rewriter.rewrite_batch(prompts)] == [rewriter.rewrite(p).candidates for p in prompts]
    # Aggressive mode samples several rows of one such prompt: each runs alone too.
    assert len(rewriter.rewrite(prompts[0], mode="aggressive").candidates) == rewriter.num_candidates


def test_genai_honours_banned_words(tiny_bpo_dir, tmp_path):
    from bpo_plugins.decoding import Decoding

    folder = tmp_path / "genai"
    export_onnx(str(tiny_bpo_dir), folder, "fp32", engine="genai", check=False)
    backend = Rewriter.from_pretrained(folder).backend
    template = backend.default_template
    free = backend.generate(["Explain gravity"], template, Decoding(max_new_tokens=8), None).generations[0].texts[0]
    # A word that is one token after a space, so the free run produced exactly the token the ban forbids.
    word = next(w for w in free.split() if w.isalpha() and len(backend.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    banned = backend.generate(["Explain gravity"], template, Decoding(max_new_tokens=8, banned_words=(word,)), None)
    text = banned.generations[0].texts[0]
    assert text != free and word not in text.split()


def test_genai_engine_refuses_models_it_cannot_build(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4}))
    from bpo_plugins.onnx_export import pick_engine

    assert pick_engine("auto", str(tmp_path)) == "optimum"
    with pytest.raises(ValueError, match="multiple of 16"):
        pick_engine("genai", str(tmp_path))


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
    with pytest.raises(ModelLoadError, match="cannot load the (ONNX|GenAI) export"):
        Rewriter.from_pretrained(garbage).warmup()
    with pytest.raises(ModelLoadError, match="not a bpo export"):
        Rewriter.from_pretrained(tmp_path, backend="onnx").warmup()


def test_gpu_paths_skip_cleanly_without_a_gpu(onnx_fp32):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a GPU is present: the CUDA path is exercised by benchmarks/gpu instead")
    with pytest.raises(ModelLoadError, match="onnxruntime-(gpu|genai-cuda)"):
        Rewriter.from_pretrained(onnx_fp32, backend="onnx", device="cuda").warmup()
    backend = Rewriter.from_pretrained(onnx_fp32).backend
    if backend.name == "onnx":
        assert backend.model.providers[0] == "CPUExecutionProvider"
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


def test_every_runtime_stops_the_same_loop_at_the_same_token(onnx_fp32, tiny_bpo_dir):
    from tests.test_rewriter import LOOPING_PROMPT

    exported = Rewriter.from_pretrained(onnx_fp32, max_new_tokens=96, cache_size=0).rewrite(LOOPING_PROMPT)
    source = Rewriter.from_pretrained(tiny_bpo_dir, max_new_tokens=96, cache_size=0).rewrite(LOOPING_PROMPT)
    assert exported.loops_cut == source.loops_cut == 1
    assert exported.candidates == source.candidates and exported.output_tokens == source.output_tokens


@pytest.mark.slow  # loads and merges the bundled model
def test_export_merged_is_a_plain_folder_that_rewrites_like_the_adapter(tmp_path):
    """What vLLM and SGLang serve: the LoRA merged into its base, greedy output unchanged."""
    import json
    import subprocess
    import sys

    from bpo_plugins import Rewriter

    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "bpo_plugins", "export", "merged", "--model", "bpo-small", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists() and json.loads((out / "bpo_template.json").read_text())["name"] == "bpo-chat"
    prompt = "Tell me about Harry Potter"
    adapter = Rewriter.from_pretrained("bpo-small", backend="transformers", max_new_tokens=24).rewrite(prompt)
    merged = Rewriter.from_pretrained(out, backend="transformers", template="bpo-chat", max_new_tokens=24).rewrite(prompt)
    assert merged.candidates == adapter.candidates
    again = subprocess.run([sys.executable, "-m", "bpo_plugins", "export", "merged", "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.fixture(scope="module", params=["transformers", ENGINES[1]])
def tiny_local_backend(request, tiny_bpo_dir, tmp_path_factory):
    """The tiny model loaded on transformers, and as a GenAI fp32 export (built once for the module)."""
    source = tiny_bpo_dir
    if request.param == "genai":
        source = tmp_path_factory.mktemp("genai") / "fp32"
        export_onnx(str(tiny_bpo_dir), source, "fp32", engine="genai")
    return Rewriter.from_pretrained(source, cache_size=0).backend


def test_rewrites_reuse_the_template_prefix_and_match_a_cold_start(tiny_local_backend):
    """The template's KV cache is computed once per model; greedy rewrites are the same as from a cold cache."""
    from bpo_plugins.decoding import Decoding

    backend = tiny_local_backend
    template = backend.default_template
    prefix = backend.template_prefix(template, template.raw is not None)
    assert len(prefix) >= 20  # "[INST] You are an expert prompt engineer..." minus its last token
    prompts = ["Explain gravity", "Tell me about cats, please", "Write a haiku about the sea", "\nLeading newline"]
    greedy = Decoding(max_new_tokens=12)
    warm, cold = prefix_reuse_runs(backend, template, prompts, greedy)
    assert warm == cold and all(texts[0] for texts in warm)
    # A sampled call in between builds a generator for its own search options; greedy still matches after it.
    backend.generate(["Explain gravity"], template, Decoding(do_sample=True, temperature=0.9, max_new_tokens=12), None)
    assert backend.generate([prompts[1]], template, greedy, None).generations[0].texts == cold[1]
    if backend.name == "onnx-genai":
        cache = backend._prefix_cache
        assert cache.hits >= len(prompts) - 1 and cache.misses >= len(prompts)
        # Greedy batch-1 rewrites draft from the prompt (prompt lookup); drafts change no token here.
        drafts, backend.prompt_lookup_tokens = backend.prompt_lookup_tokens, 0
        try:
            assert drafts > 0 and [backend.generate([p], template, greedy, None).generations[0].texts for p in prompts] == warm
        finally:
            backend.prompt_lookup_tokens = drafts
    else:
        assert backend._prefix_kv is not None and backend._prefix_kv[0] == prefix


def test_prompt_lookup_drafts_what_followed_the_longest_matching_ngram():
    from bpo_plugins.backends.genai import _lookup

    assert _lookup([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]  # "2 3" was followed by "4 5"
    assert _lookup([1, 2, 3, 4, 5, 9, 7, 3], 3) == [4, 5, 9]  # no 2- or 3-gram match: the last token alone
    assert _lookup([1, 2, 3], 4) == [] and _lookup([], 4) == []


def test_local_runtimes_stop_at_stop_strings(tiny_local_backend):
    """DRPO's <END>, a server request's "stop": generation ends there and the text leaves it out."""
    from dataclasses import replace

    from bpo_plugins.decoding import Decoding

    backend = tiny_local_backend
    template, free = backend.default_template, Decoding(max_new_tokens=24)
    full = backend.generate(["Explain gravity"], template, free, None).generations[0]
    words = full.texts[0].split()
    assert len(words) >= 4
    stop = words[len(words) // 2]
    stopped = backend.generate(["Explain gravity"], template, replace(free, stop=(stop,)), None).generations[0]
    assert stopped.texts[0] == full.texts[0][: full.texts[0].index(stop)]
    assert stopped.output_tokens < full.output_tokens
    # A server answers requests on threads: stop strings and padded batches share one fast tokenizer,
    # which raises "Already borrowed" if two threads use it at once.
    from concurrent.futures import ThreadPoolExecutor

    calls = [(["Explain gravity"], replace(free, stop=(stop,))), (["Explain gravity", "Tell me about cats"], free)] * 6
    with ThreadPoolExecutor(6) as pool:
        outputs = list(pool.map(lambda call: backend.generate(call[0], template, call[1], None), calls))
    assert all(out.generations[0].texts[0] == (stopped.texts[0] if len(call[0]) == 1 else full.texts[0])
               for call, out in zip(calls, outputs))
