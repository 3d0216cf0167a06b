"""One resolver for every model a command line, config file or integration names.

A spec is ``MODEL`` or ``MODEL@URL``, with an optional backend kind and base URL beside it:

- ``MODEL@http(s)://…`` or a ``base_url``: MODEL on an OpenAI-compatible server (vLLM, TGI, SGLang,
  llama.cpp, ``bpo serve``);
- a registry name (``bpo-small``), an existing folder, or a hub id (``org/name``): a local model;
- ``claude-…``: Anthropic's API;
- anything else (``gpt-4o-mini``): OpenAI's API.

``backend`` names the kind outright: ``transformers`` or ``onnx`` (a local runtime), ``openai`` or
``anthropic``. Every entry point (``bpo optimize``, ``bpo proxy``, ``bpo drpo``, ``bpo train``,
``bpo eval``, the LiteLLM guardrail, Ray) resolves through :func:`resolve_spec`, so one spec means
one model everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bpo_plugins.inputs import UsageError

__all__ = ["BACKEND_KINDS", "ModelSpec", "resolve_spec"]

BACKEND_KINDS: tuple[str, ...] = ("auto", "transformers", "onnx", "openai", "anthropic")
_URL_MARKERS = ("@http://", "@https://")


@dataclass(frozen=True)
class ModelSpec:
    """A model spec resolved: which backend serves ``model``, and where."""

    model: str
    #: ``local`` (transformers or ONNX Runtime in this process), ``openai`` (OpenAI's API or any
    #: OpenAI-compatible server at ``base_url``) or ``anthropic``.
    kind: Literal["local", "openai", "anthropic"]
    #: For local models: ``auto`` (the fastest runtime available), ``transformers`` or ``onnx``.
    runtime: Literal["auto", "transformers", "onnx"] = "auto"
    base_url: str | None = None

    def __str__(self) -> str:
        return f"{self.model}@{self.base_url}" if self.base_url else self.model


def _split_url(spec: str) -> tuple[str, str | None]:
    for marker in _URL_MARKERS:
        if marker in spec:
            model, _, rest = spec.partition(marker)
            return model, marker[1:] + rest
    return spec, None


def _is_local(model: str) -> bool:
    from bpo_plugins.registry import REGISTRY

    if model in REGISTRY or Path(model).expanduser().exists():
        return True
    # A hub id (THUDM/BPO) or a path, even one that does not exist yet: its load says what is missing.
    return ("/" in model or model.startswith(("~", "."))) and "://" not in model


def resolve_spec(spec: str | ModelSpec, *, backend: str = "auto", base_url: str | None = None) -> ModelSpec:
    """The one rule that turns a spec (and an optional backend kind and base URL) into a :class:`ModelSpec`.

    Raises :class:`~bpo_plugins.inputs.UsageError` (a ``ValueError``) for an unknown backend, an
    empty model name, or a URL given twice.
    """
    if isinstance(spec, ModelSpec):
        return spec
    if backend not in BACKEND_KINDS:
        raise UsageError(f"unknown backend {backend!r}: use {', '.join(BACKEND_KINDS)}")
    if not isinstance(spec, str):
        raise TypeError(f"a model spec is a string, not {type(spec).__name__}")
    model, url = (spec, None) if Path(spec).expanduser().exists() else _split_url(spec.strip())
    if url is not None and base_url is not None and url.rstrip("/") != base_url.rstrip("/"):
        raise UsageError(f"{spec!r} names a server and base_url names another ({base_url}): give one")
    url = url or base_url
    if not model:
        raise UsageError(f"no model name in {spec!r}: use MODEL or MODEL@URL")
    if backend in ("transformers", "onnx"):
        if url:
            raise UsageError(f"backend {backend!r} runs the model locally; drop the server URL {url!r}")
        return ModelSpec(model, "local", backend)  # type: ignore[arg-type]
    if backend == "anthropic":
        return ModelSpec(model, "anthropic", base_url=url)
    if backend == "openai" or url:
        return ModelSpec(model, "openai", base_url=url)
    if _is_local(model):
        return ModelSpec(model, "local")
    return ModelSpec(model, "anthropic" if model.startswith("claude") else "openai")
