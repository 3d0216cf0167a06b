"""Third-party chatter off while the package shows a long step with its own progress line."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from typing import Any

LIBRARIES = ("transformers", "optimum", "onnxruntime", "onnx_ir", "torch")


@contextlib.contextmanager
def quiet_libraries(names: tuple[str, ...] = LIBRARIES) -> Iterator[None]:
    """Errors only from these libraries' loggers and no Python warnings for the duration.

    onnxruntime's 4-bit quantizer calls ``logging.basicConfig(level=INFO)`` when imported: that
    adds a root handler and turns every library's INFO records on for the rest of the process.
    Whatever the block adds to the root logger is taken away again.
    """
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    bars = _transformers_bars() if "transformers" in names else None
    bars_were_on = bars is not None and bars.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        if bars_were_on:
            bars.disable_progress_bar()  # transformers 5's "Loading weights" and "Writing model shards" bars
        try:
            yield
        finally:
            if bars_were_on:
                bars.enable_progress_bar()
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            for handler in [h for h in root.handlers if h not in root_handlers]:
                root.removeHandler(handler)
            root.setLevel(root_level)


def _transformers_bars() -> Any:
    """transformers' logging module (its progress-bar switch), or None where transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    from transformers.utils import logging as transformers_logging

    return transformers_logging
