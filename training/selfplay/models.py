"""The optimizer a round draws candidates from, and the target that scores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bpo_plugins.guards import GuardConfig
from bpo_plugins.training.selfplay.config import SHIPPED, SelfplayConfig

# --- models -----------------------------------------------------------------------------------


def _base_path(config: SelfplayConfig) -> str:
    from bpo_plugins.registry import checkpoint

    return checkpoint(config.base_model)


def load_round_optimizer(config: SelfplayConfig, adapter: str | Path | None, export_dir: Path | None = None, **options: Any) -> Any:
    """The optimizer a round draws candidates from (and is scored as): the base model with ``adapter``,
    on ``config.runtime``, with the strict guards the bundled optimizer runs with."""
    from bpo_plugins import Rewriter
    from bpo_plugins.backends.runtime import default_runtime
    from bpo_plugins.registry import BUNDLED_ADAPTER, DEFAULT_MODEL

    options = {"guards": GuardConfig.strict(), "max_new_tokens": config.max_new_tokens, **options}
    shipped = adapter == SHIPPED
    adapter = BUNDLED_ADAPTER if shipped else adapter
    runtime = default_runtime() if config.runtime == "auto" else None
    if runtime is not None and config.base_model == "smollm2-135m-instruct":
        if shipped:
            return Rewriter.from_pretrained(DEFAULT_MODEL, **options)  # the default runtime's cached export
        if adapter is not None and export_dir is not None:
            from bpo_plugins.inputs import MANIFEST
            from bpo_plugins.onnx_export import build_export
            from bpo_plugins.templates import BPO_CHAT

            engine, precision = runtime
            if not (export_dir / MANIFEST).is_file():
                build_export(_base_path(config), export_dir, precision, engine=engine, name=f"selfplay-{export_dir.parent.name}",
                             template=BPO_CHAT, adapter=Path(adapter), desc=f"export {export_dir.parent.name} ({precision})")
            return Rewriter.from_pretrained(export_dir, backend="onnx", **options)
    return Rewriter.from_pretrained(_base_path(config), backend="transformers", adapter=adapter,
                                    template="bpo-chat" if config.base_model == "smollm2-135m-instruct" else None, **options)


def _load_target(config: SelfplayConfig) -> Any:
    from bpo_plugins.backends import load_backend
    from bpo_plugins.backends.transformers import TransformersBackend
    from bpo_plugins.registry import checkpoint
    from bpo_plugins.spec import resolve_spec

    spec = resolve_spec(config.target, base_url=config.target_base_url)  # the one rule every entry point uses
    if spec.kind == "local":  # in torch, whatever runtime serves it elsewhere: the scorer needs its log-probabilities
        return TransformersBackend.load(checkpoint(spec.model), model_id=config.target)
    return load_backend(spec)
