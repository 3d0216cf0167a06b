"""Backends turn rendered optimizer inputs into text; see :class:`~bpo_plugins.backends.base.Backend`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.result import ModelLoadError
from bpo_plugins.spec import ModelSpec, resolve_spec

__all__ = ["Backend", "BatchOutput", "Generation", "load_backend", "load_local_backend"]

#: What a local model runs on: the [local] extra. The light install (remote optimizers) has none of it.
LOCAL_STACK = ("torch", "transformers", "onnxruntime_genai", "peft")
LOCAL_INSTALL_HINT = "pip install 'bpo-plugins[local]'"


def _require_local_stack(name: str) -> None:
    missing = [module for module in LOCAL_STACK if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelLoadError(f"{name!r} is a local model and needs the local stack ({', '.join(missing)} not installed): "
                             f"{LOCAL_INSTALL_HINT}")


def load_local_backend(
    name_or_path: str,
    *,
    backend: str = "auto",
    revision: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    adapter: str | Path | None = None,
) -> Backend:
    """Resolve a registry name, local folder, export folder or hub id to a loaded local backend
    (:func:`bpo_plugins.backends.runtime.load_local`: the one place that decides)."""
    _require_local_stack(str(name_or_path))
    from bpo_plugins.backends.runtime import load_local

    return load_local(name_or_path, backend=backend, revision=revision, device=device, dtype=dtype, adapter=adapter)


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
