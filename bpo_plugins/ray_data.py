"""Bulk rewriting on Ray Data: ``map_batches`` over an actor pool, each actor holding one loaded Rewriter.

    import ray
    from bpo_plugins.ray_data import rewrite_dataset

    ds = ray.data.read_json("prompts.jsonl")                       # a "prompt" column, optionally "context"
    rewritten = rewrite_dataset(ds, model="bpo-small", actors=4)   # adds rewritten, fallback, detail

The model loads once per actor, not once per batch. Each actor runs the core Rewriter with its
guards, so a row the optimizer cannot improve comes back with its fallback reason, never as a
failed job. In greedy mode the rows are those of the local path (``bpo optimize --file``).
"""

from __future__ import annotations

from typing import Any

#: The columns rewrite_dataset adds.
OUTPUT_COLUMNS = ("rewritten", "fallback", "detail")


class RewriteBatch:
    """The actor's callable: a Rewriter loaded in ``__init__``, a pandas batch rewritten per call."""

    def __init__(self, spec: dict[str, Any], prompt_column: str, context_column: str, batch_size: int | None) -> None:
        from bpo_plugins.batching import file_batch_size
        from bpo_plugins.rewriter import Rewriter

        self.rewriter = Rewriter.from_spec(**spec).warmup()
        self.prompt_column, self.context_column = prompt_column, context_column
        # Inside the actor, as on one machine: batch only where the runtime gains from it.
        self.batch_size = batch_size or file_batch_size(self.rewriter)

    def __call__(self, batch: Any) -> Any:
        prompts = [p if isinstance(p, str) else "" for p in batch[self.prompt_column]]
        contexts = ([c if isinstance(c, str) and c else None for c in batch[self.context_column]]
                    if self.context_column in batch else [None] * len(prompts))
        results = []
        for start in range(0, len(prompts), self.batch_size):
            results += self.rewriter.rewrite_batch(prompts[start : start + self.batch_size],
                                                   contexts=contexts[start : start + self.batch_size])
        batch = batch.copy()
        batch["rewritten"] = [r.rewritten for r in results]
        batch["fallback"] = [r.fallback.value if r.fallback else None for r in results]
        batch["detail"] = [r.detail for r in results]
        return batch


def rewrite_dataset(ds: Any, *, model: str = "bpo-small", backend: str = "auto", base_url: str | None = None,
                    mode: str = "greedy", max_new_tokens: int = 256, actors: int = 2, rows_per_call: int = 32,
                    batch_size: int | None = None, prompt_column: str = "prompt", context_column: str = "context",
                    **options: Any) -> Any:
    """``ds`` with ``rewritten``, ``fallback`` and ``detail`` columns, computed by ``actors`` actors.

    ``rows_per_call``: rows Ray hands an actor at once; ``batch_size``: prompts per generate call
    inside it (default: by runtime). Rows keep their order.
    """
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    spec = {"model": model, "backend": backend, "base_url": base_url, "mode": mode, "max_new_tokens": max_new_tokens, **options}
    return ds.map_batches(RewriteBatch, fn_constructor_kwargs={"spec": spec, "prompt_column": prompt_column,
                                                               "context_column": context_column, "batch_size": batch_size},
                          batch_size=rows_per_call, batch_format="pandas", concurrency=actors)
