"""Building an ONNX Runtime export of a local model: optimum-onnx's graph or onnxruntime-genai's builder,
weight-only quantization, a parity check against the source, and a manifest.

The core builds the default runtime of a bundled model here on first use (``backends.runtime.default_export``);
``bpo export onnx`` (``bpo_plugins.export``) resolves a model name and builds through :func:`build_export`.
The folder holds the ONNX model, its tokenizer and config, and ``bpo_export.json``, which
``Rewriter.from_pretrained(folder)`` reads to pick the ONNX Runtime backend by itself.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bpo_plugins.inputs import ENGINES, MANIFEST, PRECISIONS, Manifest, UsageError
from bpo_plugins.quiet import quiet_libraries
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate

__all__ = [
    "BLOCK_SIZE", "ENGINES", "GENAI_MODEL_TYPES", "INT4_ALGO", "INT4_ALGOS", "LOGIT_ATOL", "MANIFEST", "PARITY_PROMPTS",
    "PRECISIONS", "RECIPE_VERSION", "TOKEN_AGREEMENT", "ExportRunner", "Manifest", "ParityError", "build_export", "check_parity", "genai_can_build", "genai_pad_token_id", "merged_source",
    "pick_engine",
]

PARITY_PROMPTS = (
    "Tell me about Harry Potter",
    "How can I improve my time management skills?",
    "Write a haiku about autumn.",
    "Explain recursion to a child.",
    "What are the health benefits of green tea?",
)
# Teacher-forced next-token agreement with the source (see check_parity): every token at fp32;
# quantized weights may flip near-tied tokens. bpo-small measures 99% at int8 and 92% at int4
# (benchmarks/results/int4_block_size.md). Logit tolerances are max-abs differences.
TOKEN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "int8": 0.85, "int4": 0.7}
LOGIT_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "int8": None, "int4": None}
#: Input channels per quantization block. For 4-bit, 64 was picked by measurement on bpo-small
#: (benchmarks/results/int4_block_size.md): 1.2x the decode speed of block 32 at the same
#: teacher-forced token agreement with fp32; 128 is faster again but its KL to fp32 is 1.45x and
#: degenerate rewrites rose. For 8-bit (the default runtime), 64 decodes 1.10x as fast as 32 at
#: 98.7% top-1 agreement with fp32 against 98.8% (benchmarks/results/int8_block_size.md).
BLOCK_SIZE = {"int8": 64, "int4": 64}
#: Bumped when the export recipe changes, so cached default exports built by an older one are rebuilt.
RECIPE_VERSION = 3


class ParityError(RuntimeError):
    """The exported model does not reproduce its source within the stated tolerance."""


def merged_source(path: str, adapter: Path | None, workdir: Path) -> str:
    """A LoRA adapter is merged into its base before export: ONNX Runtime runs one plain graph."""
    if adapter is None:
        return path
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(adapter)).merge_and_unload()
    target = workdir / "merged"
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(path).save_pretrained(target)
    return str(target)


def _lm_head_nodes(onnx_path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [node.name for node in graph.node if "logits" in node.output]


def _quantize(onnx_path: Path, precision: str, block_size: int | None, *, keep_lm_head: bool = True, hqq: bool = False) -> None:
    """Weight-only block quantization (MatMulNBits) of every MatMul, the LM head optionally kept fp32.

    Weight-only, because dynamic int8 (per-tensor activation quantization) wrecks small LLMs with
    activation outliers: on bpo-small it kept 2.5% of greedy tokens. On the optimum graph the LM head
    stays fp32: there it costs little next to the graph's per-op overhead, and coarse logits over a
    49k vocabulary flip near-tied greedy tokens. On the fused GenAI graph the fp32 head is half the
    bytes read per token, so int8 there buys 1.3x decode speed for 6 points of token agreement.
    """
    import onnx

    bits = 8 if precision == "int8" else 4
    with quiet_libraries():  # the quantizer module's import turns INFO logging on process-wide
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        block = block_size or BLOCK_SIZE[precision]
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(onnx_path)), bits=bits, block_size=block, is_symmetric=True,
            accuracy_level=4, nodes_to_exclude=_lm_head_nodes(onnx_path) if keep_lm_head else [],
            # HQQ (half-quadratic, data-free) fits each block's scale and zero point to its weights.
            algo_config=HQQWeightOnlyQuantConfig(block_size=block, bits=bits) if hqq else None,
        )
        quantizer.process()
    quantized = onnx_path.with_name(f"quantized_{onnx_path.name}")
    # One file: a 135M-7B quantized decoder stays under protobuf's 2 GB limit.
    quantizer.model.save_model_to_file(str(quantized), use_external_data_format=False)
    for path in onnx_path.parent.glob(onnx_path.name + "*"):
        path.unlink()
    quantized.rename(onnx_path)


# An export's next-token logits along a given continuation (row i: after the prompt and i forced
# tokens), and its own free-running greedy output.
ExportRunner = Callable[[list[int], list[int]], tuple[Any, list[int]]]


def _optimum_runner(folder: Path, device: str) -> ExportRunner:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    exported = ORTModelForCausalLM.from_pretrained(folder, provider=provider)

    def run(ids: list[int], forced: list[int]) -> tuple[Any, list[int]]:
        full = torch.tensor([ids + forced])
        prompt = torch.tensor([ids])
        with torch.inference_mode():
            logits = exported(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, len(ids) - 1 : -1]
            out = exported.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(forced),
                                    do_sample=False, pad_token_id=exported.config.eos_token_id)
        return logits.float().cpu().numpy(), out[0, len(ids) :].tolist()

    return run


def _genai_runner(folder: Path, device: str) -> ExportRunner:
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    if device == "cuda":
        config.append_provider("cuda")
    model = og.Model(config)

    def generator_for(ids: list[int], new_tokens: int) -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens + 1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        return generator

    def run(ids: list[int], forced: list[int]) -> tuple[Any, list[int]]:
        teacher = generator_for(ids, len(forced))
        logits = []
        for token in forced:  # GenAI returns the last position's logits only: one step per token
            logits.append(np.array(teacher.get_logits())[0, -1].astype(np.float32))
            teacher.append_tokens(np.array([[token]], dtype=np.int32))
        free = generator_for(ids, len(forced))
        out: list[int] = []
        while not free.is_done() and len(out) < len(forced):
            free.generate_next_token()
            out.append(int(free.get_next_tokens()[0]))
        return np.stack(logits), out

    return run


def check_parity(source: str, folder: Path, precision: str, device: str, prompts: tuple[str, ...] = PARITY_PROMPTS,
                 max_new_tokens: int = 16, min_token_agreement: float | None = None,
                 logit_atol: float | None = None, engine: str = "optimum", template: PromptTemplate | None = None) -> dict[str, Any]:
    """Compare the export with its source along the source's greedy continuation of each prompt.

    With ``template`` the prompts go in as the rewriter will send them, so parity is measured on the
    distribution the export serves; a rewriter fed bare text continues it with near-tied tokens.

    ``token_agreement`` is teacher-forced: at each step both models see the same tokens, and the
    export must pick the source's next token. Comparing two free-running decodes instead would count
    every token after a first near-tie flip as a miss, which says little about a quantized model.
    ``max_abs_logit_diff`` is over every step, ``greedy_exact_match`` compares the free-running outputs.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    run = (_genai_runner if engine == "genai" else _optimum_runner)(folder, device)
    agree = total = exact = 0
    max_diff = 0.0
    for prompt in prompts:
        text = prompt if template is None else template.render(prompt, tokenizer)
        ids = tokenizer(text, add_special_tokens=template is None or template.raw is not None)["input_ids"]
        tensor = torch.tensor([ids])
        with torch.inference_mode():
            ref_out = reference.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_new_tokens,
                                         do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, len(ids) :].tolist()
            ref_logits = reference(input_ids=torch.tensor([ids + ref_out])).logits[0, len(ids) - 1 : -1].float().numpy()
        export_logits, export_out = run(ids, ref_out)
        max_diff = max(max_diff, float(np.abs(ref_logits - export_logits).max()))
        agree += int((export_logits.argmax(axis=-1) == np.array(ref_out)).sum())
        total += len(ref_out)
        exact += ref_out == export_out
    required = TOKEN_AGREEMENT[precision] if min_token_agreement is None else min_token_agreement
    atol = LOGIT_ATOL[precision] if logit_atol is None else logit_atol
    figures: dict[str, Any] = {
        "prompts": len(prompts),
        "greedy_exact_match": exact / len(prompts),
        "token_agreement": round(agree / max(total, 1), 4),
        "max_abs_logit_diff": round(max_diff, 6),
        "required_token_agreement": required,
        "logit_atol": atol,
    }
    figures["passed"] = figures["token_agreement"] >= required and (atol is None or max_diff <= atol)
    return figures


#: Architectures onnxruntime-genai's model builder knows (``model_type`` in config.json).
GENAI_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite", "olmo"})


def pick_engine(engine: str, source: str) -> str:
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    from bpo_plugins.backends.genai import INSTALL_HINT, genai_available

    if engine == "genai" and not genai_available():
        raise ModelLoadError(INSTALL_HINT)
    if engine == "genai" and not genai_can_build(source):
        raise UsageError(f"onnxruntime-genai cannot build {source}: it needs a supported architecture "
                         f"({', '.join(sorted(GENAI_MODEL_TYPES))}) with a head size that is a multiple of 16; use --engine optimum")
    if engine != "auto":
        return engine
    return "genai" if genai_available() and genai_can_build(source) else "optimum"


def genai_can_build(source: str) -> bool:
    """The builder knows the architecture, and GroupQueryAttention's CPU kernel takes the head size."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    return config.get("model_type") in GENAI_MODEL_TYPES and head_dim % 16 == 0


def genai_pad_token_id(tokenizer: Any) -> int:
    """A pad id that rendered prompts never contain: GenAI masks every occurrence of its pad id.

    SmolLM2's builder config pads with ``<|im_end|>``, which every chat-template prompt contains.
    """
    sample = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    if tokenizer.chat_template:
        used |= set(tokenizer.apply_chat_template(sample, add_generation_prompt=True, tokenize=True))
    for candidate in [tokenizer.pad_token_id, tokenizer.unk_token_id, *tokenizer.all_special_ids]:
        if candidate is not None and candidate not in used:
            return int(candidate)
    return int(tokenizer.eos_token_id)  # the backend then runs batches row by row


def _build_optimum(source: str, staging: Path, precision: str, device: str, block_size: int | None) -> None:
    from optimum.exporters.onnx import main_export

    with quiet_libraries():
        main_export(source, output=staging, task="text-generation-with-past", device=device,
                    dtype="fp16" if precision == "fp16" else "fp32", do_validation=False)
    if precision in ("int8", "int4"):
        _quantize(staging / "model.onnx", precision, block_size)


#: The GenAI builder's int4 methods: round-to-nearest (``default``, ``rtn``), ``rtn_last`` (the LM head
#: int8), and k-quant variants, ``k_quant_mixed`` keeping the most sensitive MatMuls in int8 (these fail on
#: SmolLM2's 576-wide layers); ``hqq`` is ours: the builder's fp32 graph through onnxruntime's HQQ quantizer.
INT4_ALGOS = ("default", "rtn", "rtn_last", "k_quant", "k_quant_mixed", "k_quant_last", "hqq")
INT4_ALGO = "default"


def _build_genai(source: str, staging: Path, precision: str, device: str, block_size: int | None, workdir: Path,
                 int4_algo: str = INT4_ALGO) -> None:
    """onnxruntime-genai's builder for fp32/fp16/int4; int8 is its fp32 graph through MatMulNBits 8-bit."""
    ours = precision == "int8" or (precision == "int4" and int4_algo == "hqq")  # builder fp32, then our quantizer
    builder_precision = "fp32" if ours else precision
    # The builder prints every tensor it saves; the export's own progress bar says enough.
    with quiet_libraries(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        from onnxruntime_genai.models import builder  # imports the quantizer: see quiet_libraries

        args = (None, source, str(staging), builder_precision, device, str(workdir / "genai-cache"))
        options = {**({"int4_block_size": str(block_size)} if precision == "int4" else {}),
                   **({"int4_accuracy_level": "4"} if precision == "int4" and device == "cpu" else {}),
                   **({"int4_algo_config": int4_algo} if builder_precision == "int4" and int4_algo != "default" else {})}
        if "model_name" in inspect.signature(builder.parse_extra_options).parameters:
            # 0.13+: create_model takes the options parse_extra_options prepared (it reads the checkpoint's config)
            # (its int4_ names are deprecated aliases, and int4_block_size no longer reaches the quantizer)
            options = builder.parse_extra_options(*args, [f"{key.removeprefix('int4_')}={value}" for key, value in options.items()])
        builder.create_model(*args, **options)
        if ours:
            _quantize(staging / "model.onnx", precision, block_size, keep_lm_head=False, hqq=int4_algo == "hqq")
            for leftover in staging.glob("model.onnx.data"):
                leftover.unlink()
    for name in ("config.json", "generation_config.json"):  # the source config travels with every export
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, staging / name)
    config_path = staging / "genai_config.json"
    config = json.loads(config_path.read_text())
    from transformers import AutoTokenizer

    config["model"]["pad_token_id"] = genai_pad_token_id(AutoTokenizer.from_pretrained(source))
    config_path.write_text(json.dumps(config, indent=4))


def _checked_options(precision: str, device: str, block_size: int | None, int4_algo: str) -> int | None:
    """The quantization block size for ``precision`` (None where it takes none); a UsageError for an
    option the export cannot honour, before anything is loaded."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device != "cuda":
        raise UsageError("fp16 export needs --device cuda (CPU kernels for fp16 are slower than fp32)")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise UsageError(f"block size {block_size}: MatMulNBits takes a power of two, 16 or more")
    if int4_algo not in INT4_ALGOS:
        raise UsageError(f"unknown int4 method {int4_algo!r}: use one of {', '.join(INT4_ALGOS)}")
    return (block_size or BLOCK_SIZE[precision]) if precision in BLOCK_SIZE else None


def build_export(
    source: str, out: Path, precision: str = "fp32", device: str = "cpu", *, name: str | None = None,
    template: PromptTemplate | None = None, adapter: Path | None = None, check: bool = True,
    min_token_agreement: float | None = None, logit_atol: float | None = None, engine: str = "auto",
    block_size: int | None = None, desc: str | None = None, int4_algo: str = INT4_ALGO,
) -> Manifest:
    """Export the checkpoint in ``source`` (a folder or hub id; ``adapter``: a LoRA merged into it first) to
    ``out``; raise :class:`ParityError` when parity fails, leaving ``out`` untouched.

    ``name``: what the manifest calls the model (default ``source``); ``template``: the one it was trained
    with (default: picked from the tokenizer); ``desc``: the progress bar's label.
    """
    name = name or source
    block = _checked_options(precision, device, block_size, int4_algo)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from bpo_plugins.templates import pick_local_template

    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=4, desc=desc or f"export {name} {precision}", unit="step") as bar:
        merged = merged_source(source, adapter, Path(tmp))
        engine = pick_engine(engine, merged)
        if desc is None:
            bar.set_description(f"export {name} {precision} ({engine})")
        staging = Path(tmp) / "export"
        if engine == "genai":
            _build_genai(merged, staging, precision, device, block, Path(tmp), int4_algo)
        else:
            _build_optimum(merged, staging, precision, device, block)
        bar.update(2)
        tokenizer = AutoTokenizer.from_pretrained(merged)
        tokenizer.save_pretrained(staging)
        template = template or pick_local_template(name, bool(tokenizer.chat_template))
        parity = (
            check_parity(merged, staging, precision, device, min_token_agreement=min_token_agreement, logit_atol=logit_atol,
                         engine=engine, template=template)
            if check else {"passed": None, "skipped": True}
        )
        bar.update()
        size = sum(p.stat().st_size for p in staging.glob("*.onnx*")) / 2**20
        manifest = Manifest(source=name, precision=precision, device=device, template=asdict(template), parity=parity,
                            size_mb=round(size, 2), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), engine=engine,
                            block_size=block, int4_algo=int4_algo if engine == "genai" and precision == "int4" else None)
        (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
        if parity.get("passed") is False:
            raise ParityError(f"{precision} export of {name} failed parity: {json.dumps(parity)}")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
        bar.update()
    return manifest
