"""Bulk rewriting on Ray Data: ``map_batches`` over an actor pool, each actor holding one loaded Rewriter.

    import ray
    from bpo_plugins.ray_data import rewrite_dataset

    ds = ray.data.read_json("prompts.jsonl")                       # a "prompt" column, optionally "context"
    rewritten = rewrite_dataset(ds, model="bpo-small", actors=4)   # adds rewritten, fallback, detail

The model loads once per actor, not once per batch. Each actor runs the core Rewriter with its
guards, so a row the optimizer cannot improve comes back with its fallback reason, never as a
failed job. In greedy mode the rows are those of the local path (``bpo optimize --file``).

On GPU workers with vLLM, :func:`rewrite_dataset_vllm` lets Ray Data's vLLM processor generate
(continuous batching, prefix caching) and runs the core's checks on what it wrote::

    rewritten = rewrite_dataset_vllm(ds, model_source="THUDM/BPO", concurrency=2)
"""

from __future__ import annotations

from typing import Any

from bpo_plugins.backends.base import Backend
from bpo_plugins.registry import DEFAULT_MODEL

__all__ = ["ORIGINAL", "OUTPUT_COLUMNS", "EngineOutputs", "RewriteBatch", "VLLMRows", "rewrite_dataset", "rewrite_dataset_vllm"]

#: The columns rewrite_dataset adds.
OUTPUT_COLUMNS = ("rewritten", "fallback", "detail")
#: Where the vLLM path keeps each input row while the engine's columns pass through.
ORIGINAL = "bpo_input_row"


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


def rewrite_dataset(ds: Any, *, model: str = DEFAULT_MODEL, backend: str = "auto", base_url: str | None = None,
                    mode: str = "greedy", max_new_tokens: int = 256, actors: int = 2, rows_per_call: int = 32,
                    batch_size: int | None = None, prompt_column: str = "prompt", context_column: str = "context",
                    **options: Any) -> Any:
    """``ds`` with ``rewritten``, ``fallback`` and ``detail`` columns, computed by ``actors`` actors.

    ``rows_per_call``: rows Ray hands an actor at once; ``batch_size``: prompts per generate call
    inside it (default: by runtime). Rows keep their order: the returned dataset runs with
    ``preserve_order`` on its own copy of Ray Data's context, leaving ``ds``, the datasets derived
    from it and the process-wide ``DataContext`` as they were.
    """
    spec = {"model": model, "backend": backend, "base_url": base_url, "mode": mode, "max_new_tokens": max_new_tokens, **options}
    rewritten = ds.map_batches(RewriteBatch, fn_constructor_kwargs={"spec": spec, "prompt_column": prompt_column,
                                                                    "context_column": context_column, "batch_size": batch_size},
                               batch_size=rows_per_call, batch_format="pandas", concurrency=actors)
    # A derived dataset shares its parent's context object; a deep copy gets one of its own (ray 2.60).
    ordered = type(rewritten).copy(rewritten, _deep_copy=True)
    ordered.context.execution_options.preserve_order = True
    return ordered


class EngineOutputs(Backend):
    """The backend of a Rewriter whose texts an engine outside it generated (Ray Data's vLLM stage):
    it names the model for results and cache keys, and generates nothing itself."""

    name = "ray-vllm"

    def __init__(self, model_source: str, template: Any) -> None:
        self.model_id = model_source
        self.default_template = template

    def generate(self, prompts: Any, template: Any, decoding: Any, timeout_s: float | None) -> Any:
        raise RuntimeError("EngineOutputs holds texts generated elsewhere: use Rewriter.plan and Rewriter.check")


class VLLMRows:
    """Ray Data's preprocess and postprocess around its vLLM stage, with the core doing the work:
    :meth:`Rewriter.plan` says what to generate, :meth:`Rewriter.check` judges what came back.

    Each Ray worker builds its own Rewriter from the spec (cheap: it loads no model; the intent
    guard's MiniLM loads on the first check).
    """

    def __init__(self, model_source: str, *, template: str | None = None, prompt_column: str = "prompt", **options: Any) -> None:
        from bpo_plugins.decoding import check_mode
        from bpo_plugins.templates import pick_local_template, resolve_template

        if check_mode(options.get("mode", "greedy")) == "aggressive":
            raise ValueError("the vLLM path runs greedy and stable modes (aggressive needs banned words per candidate)")
        self.template = resolve_template(template, pick_local_template(model_source, has_chat_template=True))
        self.model_source, self.prompt_column, self.options = model_source, prompt_column, options
        self._rewriter: Any = None

    @property
    def rewriter(self) -> Any:
        if self._rewriter is None:
            from bpo_plugins.rewriter import Rewriter

            self._rewriter = Rewriter(EngineOutputs(self.model_source, self.template), template=self.template, **self.options)
        return self._rewriter

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rewriter": None}  # shipped to workers without its cache or embedder

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = row[self.prompt_column] if isinstance(row.get(self.prompt_column), str) else ""
        text, decoding = self.rewriter.plan(prompt)
        # A row that needs no generation still passes the engine stage, for one token; check() ignores it.
        sampling = {"temperature": decoding.temperature if decoding.do_sample else 0.0, "top_p": decoding.top_p,
                    "max_tokens": decoding.max_new_tokens if text is not None else 1}
        text = text or " "
        # The engine reads "prompt" or "messages", which may be the user's own column: keep it apart.
        request: dict[str, Any] = {**row, ORIGINAL: row, "sampling_params": sampling}
        if self.template.raw is not None:  # BPO checkpoints: the exact [INST] string they were trained on
            request["prompt"] = self.template.render_raw(text)
        else:
            request["messages"] = self.template.messages(text)
        return request

    def postprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        original = dict(row[ORIGINAL])
        prompt = original[self.prompt_column] if isinstance(original.get(self.prompt_column), str) else ""
        result = self.rewriter.check([prompt], [[row.get("generated_text") or ""]])[0]
        return {**original, "rewritten": result.rewritten, "fallback": result.fallback.value if result.fallback else None,
                "detail": result.detail}


def rewrite_dataset_vllm(ds: Any, *, model_source: str, template: str | None = None, mode: str = "greedy",
                         max_new_tokens: int = 256, concurrency: int = 1, batch_size: int = 64,
                         engine_kwargs: dict[str, Any] | None = None, prompt_column: str = "prompt", **options: Any) -> Any:
    """``ds`` with ``rewritten``, ``fallback`` and ``detail`` columns, generated by Ray Data's vLLM processor.

    ``concurrency`` vLLM engines (one GPU each unless ``engine_kwargs`` says otherwise) with prefix
    caching on, since every request starts with the same template. Needs ``ray[llm]`` and GPUs.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    rows = VLLMRows(model_source, template=template, prompt_column=prompt_column, mode=mode,
                    max_new_tokens=max_new_tokens, **options)
    config = vLLMEngineProcessorConfig(
        model_source=model_source, concurrency=concurrency, batch_size=batch_size,
        engine_kwargs={"enable_prefix_caching": True, **(engine_kwargs or {})},
        chat_template_stage=rows.template.raw is None,  # raw BPO prompts are already the whole input
    )
    return build_processor(config, preprocess=rows.preprocess, postprocess=rows.postprocess)(ds)
