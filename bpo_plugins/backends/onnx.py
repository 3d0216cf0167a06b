"""ONNX Runtime: an exported optimizer (``bpo export onnx``) behind the same generate path as transformers.

:func:`load_export` dispatches on the export's engine; GenAI exports run in ``backends/genai.py``. For
the optimum engine, optimum's ``ORTModelForCausalLM`` is a drop-in ``generate`` model, so batching, decoding modes and
token accounting are the transformers backend's; this file only loads sessions well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bpo_plugins.backends.base import usable_cores
from bpo_plugins.backends.genai import GenAIBackend
from bpo_plugins.backends.local import folder_revision
from bpo_plugins.backends.transformers import TransformersBackend
from bpo_plugins.result import ModelLoadError

__all__ = ["OnnxBackend", "best_provider", "load_export"]

def best_provider(device: str | None) -> tuple[str, bool]:
    """(provider, use_io_binding): TensorRT or CUDA with device-resident KV cache on GPU, else CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device != "cpu":
        for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            if provider in available:
                return provider, True
    if device == "cuda":
        raise ModelLoadError(f"--device cuda needs onnxruntime-gpu (pip install 'bpo-plugins[gpu]'); available: {available}")
    return "CPUExecutionProvider", False


def load_export(folder: str | Path, *, device: str | None = None) -> TransformersBackend | GenAIBackend:
    """Load a ``bpo export onnx`` folder with the runtime its manifest names."""
    from bpo_plugins.inputs import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.engine == "genai":
        return GenAIBackend.load_export(folder, model_id=manifest.source, template=manifest.template_object(), device=device)
    return OnnxBackend.load_export(folder, device=device)


class OnnxBackend(TransformersBackend):
    name = "onnx"
    batch_speedup = 2.27  # optimum int8, batch 8 (fp32 2.37x, int4 1.92x)

    @classmethod
    def load_export(cls, folder: str | Path, *, device: str | None = None) -> OnnxBackend:
        try:
            import onnxruntime
            from optimum.onnxruntime import ORTModelForCausalLM
        except ImportError as exc:
            raise ModelLoadError("the onnx backend needs optimum-onnx: pip install 'bpo-plugins[onnx]'") from exc
        from transformers import AutoTokenizer

        from bpo_plugins.inputs import read_manifest

        folder = Path(folder)
        manifest = read_manifest(folder)
        provider, io_binding = best_provider(device)
        options = onnxruntime.SessionOptions()
        # Decode is one small matmul chain per token: one thread per physical core, no spinning.
        options.intra_op_num_threads = usable_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            model: Any = ORTModelForCausalLM.from_pretrained(
                folder, provider=provider, session_options=options, use_io_binding=io_binding, file_name=manifest.onnx_file
            )
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:  # onnxruntime raises its own exception types for broken graphs
            raise ModelLoadError(f"cannot load the ONNX export in {folder}: {exc}") from exc
        return cls(model, tokenizer, model_id=manifest.source,
                   revision=folder_revision(folder), template=manifest.template_object(),
                   # ORT sessions cannot roll back their KV cache for drafts, nor start from a DynamicCache.
                   prompt_lookup_tokens=None, reuse_prefix=False)
