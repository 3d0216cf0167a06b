"""Backends turn rendered optimizer inputs into text; see :class:`~bpo_plugins.backends.base.Backend`."""

from __future__ import annotations

from pathlib import Path

from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.spec import ModelSpec, resolve_spec

__all__ = ["Backend", "BatchOutput", "Generation", "load_backend", "load_local_backend"]



def load_local_backend(
    name_or_path: str,
    *,
    backend: str = "auto",
    revision: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    adapter: str | Path | None = None,
) -> Backend:
    """Resolve a registry name, local folder or hub id to a loaded local backend."""
    from bpo_plugins.backends.transformers import TransformersBackend
    from bpo_plugins.registry import lookup

    if backend == "onnx" or (backend == "auto" and (Path(name_or_path) / "bpo_export.json").is_file()):
        from bpo_plugins.backends.onnx import load_export

        return load_export(name_or_path, device=device)
    entry = lookup(name_or_path)
    if entry is not None and backend == "auto" and adapter is None and device != "cuda":
        from bpo_plugins.registry import default_export

        export = default_export(entry)
        if export is not None:
            from bpo_plugins.backends.onnx import load_export

            return load_export(export, device=device)
    if entry is not None:
        return TransformersBackend.load(
            entry.path, device=device, dtype=dtype, template=entry.template, adapter=adapter or entry.adapter, model_id=entry.name
        )
    return TransformersBackend.load(name_or_path, revision=revision, device=device, dtype=dtype, adapter=adapter)


def load_backend(model: str | ModelSpec, *, backend: str = "auto", base_url: str | None = None, max_retries: int = 2,
                 api_key: str | None = None, max_concurrency: int = 8) -> Backend:
    """Any model a command line names, loaded: ``MODEL`` or ``MODEL@URL``, resolved by
    :func:`~bpo_plugins.spec.resolve_spec` (the one rule every entry point uses)."""
    spec = resolve_spec(model, backend=backend, base_url=base_url)
    if spec.kind == "openai":
        from bpo_plugins.backends.openai import OpenAIBackend

        return OpenAIBackend(spec.model, base_url=spec.base_url, api_key=api_key, max_retries=max_retries,
                             max_concurrency=max_concurrency)
    if spec.kind == "anthropic":
        from bpo_plugins.backends.anthropic import AnthropicBackend

        return AnthropicBackend(spec.model, base_url=spec.base_url, api_key=api_key, max_retries=max_retries,
                                max_concurrency=max_concurrency)
    return load_local_backend(spec.model, backend=spec.runtime)
