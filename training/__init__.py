"""The optimizer-building loop: preference data -> (prompt, optimized prompt) pairs -> SFT -> evaluation.

Installed as ``bpo_plugins.training``; driven by ``bpo data build``, ``bpo train`` and ``bpo eval``.
"""
