"""bpo-plugins: Black-Box Prompt Optimization for the LLM apps you already have.

``import bpo_plugins`` loads no model and imports no framework; the LangChain, LlamaIndex
and DSPy adapters live in ``bpo_plugins.langchain``, ``bpo_plugins.llama_index`` and
``bpo_plugins.dspy``, and each imports its framework only when imported itself.
"""

import logging

from bpo_plugins._version import __version__
from bpo_plugins.guards import GuardConfig
from bpo_plugins.result import FallbackReason, ModelLoadError, RewriteError, RewriteResult
from bpo_plugins.rewriter import Rewriter
from bpo_plugins.templates import BPO, PromptTemplate

__all__ = [
    "BPO",
    "FallbackReason",
    "GuardConfig",
    "ModelLoadError",
    "PromptTemplate",
    "RewriteError",
    "RewriteResult",
    "Rewriter",
    "__version__",
]

# A library stays quiet unless its user configures logging (the ``bpo`` command line does).
logging.getLogger("bpo_plugins").addHandler(logging.NullHandler())
