"""Loading a local model, decided once, in one place: what a name is (:func:`identify`: an export
with its manifest, a registry entry, a folder or a hub id), the runtime that runs it, and the default
runtime's export of a registry model, built on first use (:func:`default_export`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bpo_plugins.backends.base import Backend
from bpo_plugins.backends.genai import genai_available
from bpo_plugins.backends.local import folder_revision
from bpo_plugins.inputs import MANIFEST
from bpo_plugins.registry import LocalModel, cache_dir, lookup

__all__ = ["ModelSource", "default_export", "default_runtime", "identify", "load_local"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """What a model name is: an ``export`` folder (it has a manifest), a ``registry`` entry, a local
    ``folder`` or a ``hub`` id; ``entry`` is the registry entry (its checkpoint, template and adapter)."""

    kind: Literal["export", "registry", "folder", "hub"]
    name: str
    entry: LocalModel | None = None


def identify(name_or_path: str, *, exports: bool = True) -> ModelSource:
    """Decide once what ``name_or_path`` is. An export folder wins (its manifest names its runtime)
    unless ``exports`` is off (transformers was asked for); a registry name's files are found (the
    bundled model is converted on first use)."""
    if exports and (Path(name_or_path) / MANIFEST).is_file():
        return ModelSource("export", name_or_path)
    entry = lookup(name_or_path)
    if entry is not None:
        return ModelSource("registry", name_or_path, entry)
    return ModelSource("folder" if Path(name_or_path).is_dir() else "hub", name_or_path)


def load_local(name_or_path: str, *, backend: str = "auto", revision: str | None = None, device: str | None = None,
               dtype: str = "auto", adapter: str | Path | None = None) -> Backend:
    """A local model loaded on its runtime: ``backend="onnx"`` or an export folder, ONNX Runtime (the
    engine its manifest names); a registry model with no adapter or GPU asked for, the default
    runtime's export (:func:`default_export`); else transformers."""
    from bpo_plugins.backends.onnx import load_export
    from bpo_plugins.backends.transformers import TransformersBackend

    if backend == "onnx":
        return load_export(name_or_path, device=device)
    source = identify(name_or_path, exports=backend == "auto")
    if source.kind == "export":
        return load_export(name_or_path, device=device)
    entry = source.entry
    if entry is None:
        return TransformersBackend.load(name_or_path, revision=revision, device=device, dtype=dtype, adapter=adapter)
    export = default_export(entry) if backend == "auto" and adapter is None and device != "cuda" else None
    if export is not None:
        return load_export(export, device=device)
    return TransformersBackend.load(entry.path, device=device, dtype=dtype, template=entry.template, adapter=adapter or entry.adapter,
                                    model_id=entry.name)


def default_runtime() -> tuple[str, str] | None:
    """(engine, precision) of the default runtime for bundled models; None without onnxruntime.

    Measured on bpo-small (benchmarks/RESULTS.md): GenAI int8 (block 64) decodes about 8x faster
    than transformers and 1.25x llama.cpp, and rewrites 350 held-out prompts within 2 points of
    fp32 on fallback and expansion. int4 decodes faster still, but expands 6 points fewer prompts than fp32, so it is
    opt-in (``bpo export onnx --precision int4``). Without onnxruntime-genai, the optimum graph with
    int8 weights is about 3x faster than transformers.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    if genai_available():
        return "genai", "int8"
    if importlib.util.find_spec("optimum.onnxruntime") is not None:
        return "optimum", "int8"
    return None


def default_export(entry: LocalModel) -> Path | None:
    """The ONNX Runtime export of a registry model, built once into the cache dir; None when unavailable."""
    runtime = default_runtime()
    if runtime is None:
        return None
    engine, precision = runtime
    from bpo_plugins.onnx_export import RECIPE_VERSION, build_export

    identity = folder_revision(entry.path) + ("" if entry.adapter is None else folder_revision(entry.adapter))
    folder = cache_dir() / "exports" / f"{entry.name}-{engine}-{precision}-r{RECIPE_VERSION}-{identity.replace('local-', '')}"
    if not (folder / MANIFEST).is_file():
        try:
            build_export(str(entry.path), folder, precision, engine=engine, name=entry.name, template=entry.template,
                         adapter=entry.adapter, desc=f"first run only: building the {precision} runtime of {entry.name} (~20 s)")
        except Exception as exc:  # any export failure: the transformers runtime still works
            log.warning("ONNX export of %s failed (%s); using transformers", entry.name, exc)
            return None
    return folder
