"""``bpo export onnx`` and ``bpo export merged``: the command line's recipes over the core's builder.

The build itself (optimum-onnx or onnxruntime-genai, quantization, parity, manifest) is the core's
:mod:`bpo_plugins.onnx_export`, since the default runtime of a bundled model is built there on first
use; this module resolves the model names users type and writes the folders they ask for.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from bpo_plugins.inputs import Manifest, UsageError
from bpo_plugins.onnx_export import INT4_ALGO, build_export, merged_source
from bpo_plugins.templates import PromptTemplate

__all__ = ["export_merged", "export_onnx"]


def _source(model: str) -> tuple[str, PromptTemplate | None, Path | None]:
    """(checkpoint, template, adapter) of a registry name; a folder or hub id is its own checkpoint."""
    from bpo_plugins.registry import lookup

    entry = lookup(model)
    if entry is None:
        return model, None, None
    return str(entry.path), entry.template, entry.adapter


def export_onnx(
    model: str, out: Path, precision: str = "fp32", device: str = "cpu", *, check: bool = True,
    min_token_agreement: float | None = None, logit_atol: float | None = None, engine: str = "auto",
    block_size: int | None = None, desc: str | None = None, int4_algo: str = INT4_ALGO,
) -> Manifest:
    """Export ``model`` (registry name, folder or hub id) to ``out``; raise ParityError when parity fails.
    ``desc``: the progress bar's label (default ``export MODEL PRECISION``)."""
    path, template, adapter = _source(model)
    return build_export(path, Path(out), precision, device, name=model, template=template, adapter=adapter, check=check,
                        min_token_agreement=min_token_agreement, logit_atol=logit_atol, engine=engine,
                        block_size=block_size, desc=desc, int4_algo=int4_algo)


def export_merged(model: str, out: Path) -> Path:
    """A plain Hugging Face folder (LoRA merged, tokenizer included) that vLLM and SGLang serve as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, template, adapter = _source(model)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty: pick a new folder")
    with tempfile.TemporaryDirectory() as tmp:
        source = merged_source(path, adapter, Path(tmp))
        # Reload the merged weights to write them where asked, with the tokenizer that goes with them.
        AutoModelForCausalLM.from_pretrained(source).save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
    if template is not None:  # the template the checkpoint was trained with, for Rewriter.from_openai users
        (out / "bpo_template.json").write_text(json.dumps(asdict(template), indent=2))
    return out
