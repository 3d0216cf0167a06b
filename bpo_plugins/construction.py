"""The ways to build a :class:`~bpo_plugins.Rewriter`: the bundled optimizer (shared or with options),
a local model by name (:meth:`from_pretrained`), any ``MODEL`` or ``MODEL@URL`` (:meth:`from_spec`),
an OpenAI-compatible server or Claude. Each builds a backend (or a loader, run on first use) and hands
it to the Rewriter; which runtime loads a local model is decided in :mod:`bpo_plugins.backends.runtime`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, TypeVar

from bpo_plugins.backends.base import Backend
from bpo_plugins.guards import GuardConfig
from bpo_plugins.inputs import UsageError
from bpo_plugins.spec import ModelSpec, resolve_spec

__all__ = ["RewriterConstructors"]

R = TypeVar("R", bound="RewriterConstructors")

_shared_default: Any = None
_default_lock = threading.Lock()


class RewriterConstructors:
    """The Rewriter's class methods that build one; ``cls(backend_or_loader, **options)`` makes it."""

    #: The model spec this Rewriter was resolved from (:meth:`from_spec`); None when built from a backend.
    spec: ModelSpec | None = None

    @classmethod
    def shared(cls: type[R]) -> R:
        """The process-wide bundled ``bpo-small`` optimizer: one instance, so every integration that
        falls back to it shares one model and one cache. Loaded on first use."""
        from bpo_plugins.registry import DEFAULT_MODEL

        global _shared_default
        with _default_lock:
            if _shared_default is None:
                _shared_default = cls.from_pretrained(DEFAULT_MODEL)
            return _shared_default

    @classmethod
    def default(cls: type[R], **options: Any) -> R:
        """A new bundled ``bpo-small`` optimizer with ``options`` (offline, loaded on first use).

        Without options it returns :meth:`shared`, as it always has; call :meth:`shared` to say so.
        """
        from bpo_plugins.registry import DEFAULT_MODEL

        if not options:
            return cls.shared()
        return cls.from_pretrained(DEFAULT_MODEL, **options)

    @classmethod
    def from_pretrained(
        cls: type[R],
        name_or_path: str | Path,
        *,
        backend: str = "auto",
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        adapter: str | Path | None = None,
        **options: Any,
    ) -> R:
        """A registry name (``bpo-small``), a local folder, or a hub id such as ``THUDM/BPO``.

        Loading is deferred to the first rewrite, so constructing a Rewriter is free.
        """
        from bpo_plugins.backends import load_local_backend
        from bpo_plugins.registry import REGISTRY

        if backend not in ("auto", "transformers", "onnx"):
            raise ValueError(f"unknown local backend {backend!r}: use 'auto', 'transformers' or 'onnx'")
        if str(name_or_path) in REGISTRY:
            # The bundled optimizers are 135M models: their added names are inventions, their drifts real.
            options.setdefault("guards", GuardConfig.strict())

        def load() -> Backend:
            return load_local_backend(
                str(name_or_path), backend=backend, revision=revision, device=device, dtype=dtype, adapter=adapter
            )

        return cls(load, **options)

    @classmethod
    def from_spec(cls: type[R], model: str | ModelSpec, *, backend: str = "auto", base_url: str | None = None,
                  api_key: str | None = None, **options: Any) -> R:
        """The optimizer a command line, config file or integration names: ``MODEL`` or ``MODEL@URL``,
        resolved by :func:`~bpo_plugins.spec.resolve_spec`, the rule every entry point shares."""
        spec = resolve_spec(model, backend=backend, base_url=base_url)
        adapter = options.pop("adapter", None)
        if adapter is not None and spec.kind != "local":
            raise UsageError(f"an adapter applies to a local model, and {spec} is served over {spec.kind}'s API: drop the adapter")
        if spec.kind == "local":
            rewriter = cls.from_pretrained(spec.model, backend=spec.runtime, adapter=adapter, **options)
        elif spec.kind == "anthropic":
            rewriter = cls.from_anthropic(spec.model, base_url=spec.base_url, api_key=api_key, **options)
        else:
            rewriter = cls.from_openai(spec.model, base_url=spec.base_url, api_key=api_key, **options)
        rewriter.spec = spec
        return rewriter

    @classmethod
    def from_openai(
        cls: type[R],
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 8,
        **options: Any,
    ) -> R:
        """A remote optimizer on any OpenAI-compatible server (vLLM, TGI, llama.cpp), or an API LLM as prompt engineer."""
        from bpo_plugins.backends.openai import OpenAIBackend

        return cls(
            OpenAIBackend(model, base_url=base_url, api_key=api_key, max_concurrency=max_concurrency), **options
        )

    @classmethod
    def from_anthropic(
        cls: type[R], model: str, *, api_key: str | None = None, base_url: str | None = None, max_concurrency: int = 8, **options: Any
    ) -> R:
        """Claude as the prompt engineer: the LLM-as-optimizer baseline of the BPO paper."""
        from bpo_plugins.backends.anthropic import AnthropicBackend

        return cls(
            AnthropicBackend(model, api_key=api_key, base_url=base_url, max_concurrency=max_concurrency), **options
        )
