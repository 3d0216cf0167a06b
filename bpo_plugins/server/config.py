"""``bpo proxy`` settings: a TOML or JSON file, then ``BPO_PROXY_*`` environment variables, then flags.

.. code-block:: toml

    upstream = "http://localhost:8001/v1"     # any OpenAI-compatible base URL
    rewrite_timeout_s = 1.0                   # fail open: past this the original prompt goes on

    [default]                                 # every model not matched below
    rewrite = true

    [models."gpt-4o*"]                        # glob on the request's "model"; first match wins
    rewrite = true
    drpo = "gpt-3.5-turbo"                    # a DRPO preset name or an artifact path

    [models."text-embedding-*"]
    rewrite = false

Secrets come from the environment only: ``BPO_UPSTREAM_API_KEY`` (sent upstream when the client
sends no key of its own, or sent a gateway key), ``BPO_UPSTREAM_ANTHROPIC_API_KEY`` (the same for
``/v1/messages``) and ``BPO_GATEWAY_KEYS`` (comma-separated keys clients must present). A config file
that holds any of them is refused, so keys stay out of repositories.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from bpo_plugins.registry import DEFAULT_MODEL
from bpo_plugins.result import MODES

ENV_PREFIX = "BPO_PROXY_"
SECRET_FIELDS = ("upstream_api_key", "upstream_anthropic_api_key", "gateway_keys")


@dataclass(frozen=True)
class Treatment:
    """What the gateway does to requests for one model."""

    rewrite: bool = True
    mode: str = "greedy"
    #: A DRPO preset name or artifact path, applied to the system prompt; None for none.
    drpo: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rewrite, bool):
            raise ValueError(f"treatment rewrite must be true or false, got {self.rewrite!r}")
        if self.mode not in MODES:
            raise ValueError(f"treatment mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.drpo is not None and not isinstance(self.drpo, str):
            raise ValueError(f"treatment drpo must be a preset name or a path, got {self.drpo!r}")


@dataclass(frozen=True)
class GatewayConfig:
    upstream: str = "https://api.openai.com/v1"
    upstream_api_key: str | None = field(default=None, repr=False)
    #: Where ``/v1/messages`` goes, as the ``anthropic`` client takes it (``https://api.anthropic.com``,
    #: no ``/v1``); None sends it to ``upstream``.
    anthropic_upstream: str | None = None
    upstream_anthropic_api_key: str | None = field(default=None, repr=False)
    gateway_keys: tuple[str, ...] = field(default=(), repr=False)
    #: The BPO optimizer: a registry name, folder or hub id, or a model on ``optimizer_base_url``.
    optimizer: str = DEFAULT_MODEL
    optimizer_backend: str = "auto"
    optimizer_base_url: str | None = None
    #: Seconds a rewrite may take before the original prompt is sent instead.
    rewrite_timeout_s: float = 2.0
    #: Seconds to connect upstream, and between two bytes of its answer (a hang or a stalled stream).
    connect_timeout_s: float = 10.0
    upstream_timeout_s: float = 600.0
    max_body_bytes: int = 32 << 20
    max_connections: int = 1000
    #: ``auto`` batches concurrent rewrites only on runtimes measured to gain from it; ``on`` / ``off`` force it.
    batch: str = "auto"
    batch_window_ms: float = 5.0
    max_batch: int = 8
    #: A SQLite file for the greedy rewrite cache, shared by workers and restarts on one host.
    cache_path: str | None = None
    #: ``redis://HOST:PORT/DB`` (Redis or Valkey; ``?ttl_s=`` and ``?timeout_ms=`` optional): the greedy
    #: rewrite cache shared by every worker and replica.
    cache_url: str | None = field(default=None, repr=False)  # it may hold a password
    #: Worker processes on one port (uvicorn's process manager); each loads the optimizer once.
    workers: int = 1
    #: Seconds a shutdown waits for in-flight requests and streams to finish.
    drain_timeout_s: float = 30.0
    default: Treatment = Treatment()
    models: tuple[tuple[str, Treatment], ...] = ()

    def __post_init__(self) -> None:
        if not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"upstream must be an http(s) URL, got {self.upstream!r}")
        if self.anthropic_upstream is not None and not self.anthropic_upstream.startswith(("http://", "https://")):
            raise ValueError(f"anthropic_upstream must be an http(s) URL, got {self.anthropic_upstream!r}")
        if self.cache_path and self.cache_url:
            raise ValueError("give cache_path (SQLite, one host) or cache_url (Redis, every host), not both")
        if self.cache_url is not None and not self.cache_url.startswith(("redis://", "rediss://", "valkey://", "valkeys://", "unix://")):
            raise ValueError("cache_url must be a redis://HOST:PORT/DB URL")
        for name in ("rewrite_timeout_s", "connect_timeout_s", "upstream_timeout_s", "max_body_bytes", "max_connections", "max_batch",
                     "workers", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.batch not in ("auto", "on", "off"):
            raise ValueError(f"batch must be auto, on or off, got {self.batch!r}")

    def treatment(self, model: str) -> Treatment:
        if not self.models:
            return self.default
        return _first_match(self.models, self.default, model)

    @property
    def rewrites_anything(self) -> bool:
        return self.default.rewrite or any(t.rewrite for _, t in self.models)

    @property
    def batch_enabled(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.batch]


@functools.lru_cache(maxsize=4096)
def _first_match(models: tuple[tuple[str, Treatment], ...], default: Treatment, model: str) -> Treatment:
    return next((t for pattern, t in models if fnmatch.fnmatchcase(model, pattern)), default)


def _treatment(value: Any, where: str) -> Treatment:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a table of rewrite / mode / drpo")
    unknown = set(value) - {f.name for f in fields(Treatment)}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    return Treatment(**value)


def _coerce(name: str, raw: Any) -> Any:
    """A file or environment value as the field's type (environment values are strings)."""
    kind = get_type_hints(GatewayConfig)[name]
    if raw is None:
        return None
    if kind in (int, float):
        try:
            return kind(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if name == "gateway_keys":
        keys = raw.split(",") if isinstance(raw, str) else raw
        return tuple(k.strip() for k in keys if k.strip())
    if not isinstance(raw, str):
        raise ValueError(f"{name} must be a string, got {raw!r}")
    return raw


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")  # FileNotFoundError names the file
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings")
    secrets = [k for k in SECRET_FIELDS if k in data]
    if secrets:
        raise ValueError(f"{path}: {', '.join(secrets)} must come from the environment (BPO_UPSTREAM_API_KEY, "
                         "BPO_UPSTREAM_ANTHROPIC_API_KEY, BPO_GATEWAY_KEYS), not a file")
    return data


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None, **overrides: Any) -> GatewayConfig:
    """Settings from ``path`` (TOML or JSON), then ``BPO_PROXY_<NAME>`` variables, then ``overrides`` (flags)."""
    env = os.environ if env is None else env
    data = read_file(path) if path is not None else {}
    scalar = {f.name for f in fields(GatewayConfig)} - {"default", "models"}
    unknown = set(data) - scalar - {"default", "models"}
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    values: dict[str, Any] = {name: _coerce(name, data[name]) for name in scalar & set(data)}
    for name in scalar - set(SECRET_FIELDS):
        if ENV_PREFIX + name.upper() in env:
            values[name] = _coerce(name, env[ENV_PREFIX + name.upper()])
    if env.get("BPO_UPSTREAM_API_KEY"):
        values["upstream_api_key"] = env["BPO_UPSTREAM_API_KEY"]
    if env.get("BPO_UPSTREAM_ANTHROPIC_API_KEY"):
        values["upstream_anthropic_api_key"] = env["BPO_UPSTREAM_ANTHROPIC_API_KEY"]
    if env.get("BPO_GATEWAY_KEYS"):
        values["gateway_keys"] = _coerce("gateway_keys", env["BPO_GATEWAY_KEYS"])
    values.update({k: _coerce(k, v) for k, v in overrides.items() if v is not None})
    config = GatewayConfig(**values)
    if "default" in data:
        config = replace(config, default=_treatment(data["default"], "[default]"))
    models = data.get("models", {})
    if not isinstance(models, Mapping):
        raise ValueError("[models] must be a table of model-name globs")
    return replace(config, models=tuple((str(p), _treatment(t, f"[models.{p!r}]")) for p, t in models.items()))
