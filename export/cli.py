"""``bpo export onnx`` and ``bpo export merged``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bpo_plugins.registry import DEFAULT_MODEL

__all__ = ["export_app"]

export_app = typer.Typer(help="Export optimizers to low-latency runtimes.", no_args_is_help=True)


@export_app.command("onnx")
def export_onnx_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Export folder (replaced if it exists).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name, folder or hub id.")] = DEFAULT_MODEL,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | int8 | int4")] = "int8",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    engine: Annotated[str, typer.Option("--engine", help="auto | genai (onnxruntime-genai builder) | optimum")] = "auto",
    check: Annotated[bool, typer.Option("--check/--no-check", help="Greedy and logit parity against the source.")] = True,
    min_token_agreement: Annotated[float | None, typer.Option("--min-token-agreement", min=0, max=1)] = None,
    logit_atol: Annotated[float | None, typer.Option("--logit-atol", min=0)] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Quantization block for int8/int4 (default 64).")] = None,
    int4_algo: Annotated[str, typer.Option("--int4-algo", help="GenAI int4 method: default | rtn | rtn_last | k_quant | k_quant_mixed | k_quant_last.")] = "default",
) -> None:
    """Export a decoder with past key values, quantize it, check parity, write a manifest."""
    from bpo_plugins.export.onnx import export_onnx

    manifest = export_onnx(model, out, precision, device, check=check, min_token_agreement=min_token_agreement,
                           logit_atol=logit_atol, engine=engine, block_size=block_size, int4_algo=int4_algo)
    typer.echo(json.dumps({"out": str(out), "engine": manifest.engine, "precision": manifest.precision, "size_mb": manifest.size_mb, "parity": manifest.parity}, indent=2))


@export_app.command("merged")
def export_merged_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="A new folder for the merged Hugging Face checkpoint.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name, folder or hub id.")] = DEFAULT_MODEL,
) -> None:
    """Merge the optimizer's LoRA into its base: a plain folder vLLM and SGLang serve as it is."""
    from bpo_plugins.export.onnx import export_merged

    folder = export_merged(model, out)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    typer.echo(f"merged checkpoint in {folder} ({size:.0f} MB); serve it: vllm serve {folder} --enable-prefix-caching")
