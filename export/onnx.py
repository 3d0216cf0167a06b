"""``bpo export onnx``: a decoder with past key values through optimum-onnx, then onnxruntime quantizers.

The export folder holds the ONNX model, its tokenizer and config, and ``bpo_export.json``: source
model, precision, template, parity figures and size. ``Rewriter.from_pretrained(folder)`` reads
that manifest and picks the ONNX Runtime backend by itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate

MANIFEST = "bpo_export.json"
PRECISIONS = ("fp32", "fp16", "int8", "int4")
PARITY_PROMPTS = (
    "Tell me about Harry Potter",
    "How can I improve my time management skills?",
    "Write a haiku about autumn.",
    "Explain recursion to a child.",
    "What are the health benefits of green tea?",
)
# Greedy tokens must match exactly at fp32; quantized weights may flip near-tied tokens, so they
# only need to agree on this share of generated tokens. Logit tolerances are max-abs differences.
TOKEN_AGREEMENT = {"fp32": 1.0, "fp16": 0.8, "int8": 0.5, "int4": 0.3}
LOGIT_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "int8": None, "int4": None}


class ParityError(RuntimeError):
    """The exported model does not reproduce its source within the stated tolerance."""


@dataclass
class Manifest:
    source: str
    precision: str
    device: str
    template: dict[str, Any]
    parity: dict[str, Any]
    size_mb: float
    onnx_file: str = "model.onnx"
    created: str = ""
    format_version: int = 1

    def template_object(self) -> PromptTemplate:
        return PromptTemplate(**self.template)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(**raw)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{folder} is not a bpo export: {MANIFEST} is missing (create one with `bpo export onnx`)") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelLoadError(f"{path} is corrupted: {exc}; export again with `bpo export onnx`") from exc
    if manifest.format_version != 1 or manifest.precision not in PRECISIONS:
        raise ModelLoadError(f"{path}: unsupported export (format {manifest.format_version}, precision {manifest.precision})")
    if not (folder / manifest.onnx_file).is_file():
        raise ModelLoadError(f"{folder}: the manifest names {manifest.onnx_file}, which is missing; export again")
    return manifest


def _source(model: str) -> tuple[str, PromptTemplate | None, Path | None]:
    from bpo_plugins.registry import resolve

    entry = resolve(model)
    if entry is None:
        return model, None, None
    return str(entry.path), entry.template, entry.adapter


def _merged_source(path: str, adapter: Path | None, workdir: Path) -> str:
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The torch tracer warns about every data-dependent branch of the model: noise to a user."""
    loggers = [logging.getLogger(name) for name in ("optimum", "transformers")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _lm_head_nodes(onnx_path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [node.name for node in graph.node if "logits" in node.output]


def _quantize(onnx_path: Path, precision: str) -> None:
    """Weight-only block quantization (MatMulNBits, block 32) of every MatMul but the LM head.

    Weight-only, because dynamic int8 (per-tensor activation quantization) wrecks small LLMs with
    activation outliers: on bpo-small it kept 2.5% of greedy tokens. The LM head stays fp32: it is
    tied to the embedding, and coarse logits over a 49k vocabulary flip greedy tokens.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    bits = 8 if precision == "int8" else 4
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(onnx_path)), bits=bits, block_size=32, is_symmetric=True, accuracy_level=4,
        nodes_to_exclude=_lm_head_nodes(onnx_path),
    )
    quantizer.process()
    quantized = onnx_path.with_name(f"model_{precision}.onnx")
    quantizer.model.save_model_to_file(str(quantized), use_external_data_format=False)
    for path in onnx_path.parent.glob("model.onnx*"):
        path.unlink()
    quantized.rename(onnx_path)


def check_parity(source: str, folder: Path, precision: str, device: str, prompts: tuple[str, ...] = PARITY_PROMPTS,
                 max_new_tokens: int = 16, min_token_agreement: float | None = None,
                 logit_atol: float | None = None) -> dict[str, Any]:
    """Greedy token agreement and max logit difference of the export against its source model."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    exported = ORTModelForCausalLM.from_pretrained(folder, provider=provider)
    agree = total = exact = 0
    max_diff = 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            ref_logits = reference(**ids).logits
            ort_logits = exported(**ids).logits.to(ref_logits.device).float()
            max_diff = max(max_diff, float((ref_logits - ort_logits).abs().max()))
            kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
            ref_out = reference.generate(**ids, **kwargs)[0, ids["input_ids"].shape[1] :].tolist()
            ort_out = exported.generate(**ids, **kwargs)[0, ids["input_ids"].shape[1] :].tolist()
        width = max(len(ref_out), len(ort_out))
        agree += sum(a == b for a, b in zip(ref_out, ort_out))
        total += width
        exact += ref_out == ort_out
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


def export_onnx(
    model: str, out: Path, precision: str = "fp32", device: str = "cpu", *, check: bool = True,
    min_token_agreement: float | None = None, logit_atol: float | None = None,
) -> Manifest:
    """Export ``model`` (registry name, folder or hub id) to ``out``; raise ParityError when parity fails."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device != "cuda":
        raise ValueError("fp16 export needs --device cuda (CPU kernels for fp16 are slower than fp32)")
    from optimum.exporters.onnx import main_export
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from bpo_plugins.templates import pick_local_template

    path, template, adapter = _source(model)
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=4, desc=f"export {model} {precision}", unit="step") as bar:
        source = _merged_source(path, adapter, Path(tmp))
        staging = Path(tmp) / "export"
        with _quiet():
            main_export(source, output=staging, task="text-generation-with-past", device=device,
                        dtype="fp16" if precision == "fp16" else "fp32", do_validation=False)
        bar.update()
        if precision in ("int8", "int4"):
            _quantize(staging / "model.onnx", precision)
        bar.update()
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.save_pretrained(staging)
        template = template or pick_local_template(model, bool(tokenizer.chat_template))
        parity = (
            check_parity(source, staging, precision, device, min_token_agreement=min_token_agreement, logit_atol=logit_atol)
            if check else {"passed": None, "skipped": True}
        )
        bar.update()
        size = sum(p.stat().st_size for p in staging.glob("*.onnx*")) / 2**20
        manifest = Manifest(source=model, precision=precision, device=device, template=asdict(template), parity=parity,
                            size_mb=round(size, 2), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
        if parity.get("passed") is False:
            raise ParityError(f"{precision} export of {model} failed parity: {json.dumps(parity)}")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
        bar.update()
    return manifest
