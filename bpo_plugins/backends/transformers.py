"""Local causal LMs through Hugging Face transformers: THUDM/BPO, the bundled bpo-small, any chat model."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpo_plugins.backends.base import BatchOutput
from bpo_plugins.backends.local import LocalBackend, TokenStream, _batch_output, folder_revision
from bpo_plugins.decoding import Decoding, loop_cut
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["STATIC_CACHE_LEN", "TransformersBackend"]

#: Tokens of prompt plus rewrite the GPU path's static KV cache holds; longer inputs decode on a dynamic cache.
STATIC_CACHE_LEN = 2048


class TransformersBackend(LocalBackend):
    name = "transformers"
    batch_speedup = 1.31  # eager fp32, batch 8 (batch 1 has prompt-lookup decoding)

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_id: str,
        revision: str = "",
        template: PromptTemplate | None = None,
        prompt_lookup_tokens: int | None = 10,
        reuse_prefix: bool = True,
        static_cache_len: int | None = None,
    ) -> None:
        super().__init__(tokenizer, model_id=model_id, revision=revision, template=template)
        self.model = model.eval() if hasattr(model, "eval") else model  # ORT models have no eval()
        # Decoder-only batches must be padded on the left so every row ends where generation starts.
        tokenizer.padding_side = "left"
        # A rewrite copies long spans of its input: draft tokens from n-gram matches in the prompt,
        # verified in one forward pass (prompt-lookup decoding). Exact for greedy, batch size 1 only.
        self.prompt_lookup_tokens = prompt_lookup_tokens
        self.reuse_prefix = reuse_prefix
        self._prefix_kv: tuple[tuple[int, ...], Any] | None = None
        # With a length, decode runs on a preallocated StaticCache (one per batch size, reused across
        # calls so the compiled decode step is reused too), compiled by transformers on CUDA.
        # Prompt-lookup drafts and the DynamicCache prefix need a dynamic cache: they are off then.
        self.static_cache_len = static_cache_len
        if static_cache_len:
            self.prompt_lookup_tokens = None
            self.reuse_prefix = False
        self._static_caches: dict[int, Any] = {}

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        template: PromptTemplate | None = None,
        adapter: str | Path | None = None,
        gguf_file: str | None = None,
        model_id: str | None = None,
        trust_remote_code: bool = False,
    ) -> TransformersBackend:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - torch and transformers are core dependencies
            raise ModelLoadError(f"the transformers backend needs torch and transformers: {exc}") from exc
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device} needs a GPU and a CUDA build of torch; this one has none (torch {torch.__version__})")
        source = str(name_or_path)
        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        model, tokenizer = _load_weights(source, kwargs, dtype, device, adapter)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        rev = _revision(source, revision, model, adapter)
        # Batch-1 decode on a GPU is bound by reading the weights once per token: a static KV cache lets
        # transformers compile the decode step into CUDA graphs (no per-token Python or kernel launch overhead).
        return cls(model, tokenizer, model_id=model_id or source, revision=rev, template=template,
                   static_cache_len=STATIC_CACHE_LEN if device.startswith("cuda") else None)

    def generate_texts(
        self, texts: Sequence[str], decoding: Decoding, timeout_s: float | None, add_special_tokens: bool,
        streamer: TokenStream | None = None, prefix: Sequence[int] = (), min_new: Sequence[int] = (),
    ) -> BatchOutput:
        import torch

        batch = self._tokenize(texts, add_special_tokens)
        n, start_at = decoding.num_candidates, batch["input_ids"].shape[1]
        # Each output row's prompt ids, for the loop stop's prompt-copy check (generate repeats a text n times).
        prompts = self._row_prompts(batch["input_ids"], n) if decoding.stop_loops else []
        kwargs = {**self._sampling_kwargs(decoding, n, timeout_s),
                  **self._stop_kwargs(decoding, start_at, prompts, [m for m in min_new for _ in range(n)])}
        kwargs.update(self._speedup_kwargs(decoding, len(texts), streamer, "bad_words_ids" in kwargs or bool(min_new)))
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            # transformers 5's prompt-lookup decoding on a prefilled cache is not greedy-exact (4.57's was): lookup wins
            if "prompt_lookup_num_tokens" in kwargs and not _lookup_keeps_prefix_cache():
                prefix = ()
            kwargs.update(self._cache_kwargs(batch["input_ids"], decoding, prefix, len(texts) * n))
            output = self.model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
        rows, cuts = self._new_rows(output, start_at, prompts, decoding)
        return _batch_output(self._decode_rows(rows, decoding), [len(row) for row in rows], n, elapsed=elapsed,
                             timed_out=timeout_s is not None and elapsed >= timeout_s,
                             input_tokens=int(batch["input_ids"].numel()), cut=[at is not None for at in cuts])

    # -- the pieces of one generate call ------------------------------------------------------

    def _tokenize(self, texts: Sequence[str], add_special_tokens: bool) -> Any:
        """The texts as one left-padded batch on the model's device."""
        with self._lock:
            batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        return batch.to(self.model.device)

    def _row_prompts(self, input_ids: Any, n: int) -> list[list[int]]:
        pad = self.tokenizer.pad_token_id
        return [[t for t in row if t != pad] for row in input_ids.tolist() for _ in range(n)]

    def _sampling_kwargs(self, decoding: Decoding, n: int, timeout_s: float | None) -> dict[str, Any]:
        """How many tokens, how sampled, how many candidates, and the time limit."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "do_sample": decoding.do_sample,
            "num_return_sequences": n,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if decoding.do_sample:
            kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if timeout_s is not None:
            kwargs["max_time"] = timeout_s
        return kwargs

    def _stop_kwargs(self, decoding: Decoding, start_at: int, prompts: list[list[int]], floors: list[int]) -> dict[str, Any]:
        """Where rows end: banned words, end of sequence or a newline, a minimum length, a loop, a stop string."""
        kwargs: dict[str, Any] = {}
        banned = self._banned(decoding.banned_words)
        if banned:
            kwargs["bad_words_ids"] = banned
        config = getattr(self.model, "generation_config", None)
        configured = getattr(config, "eos_token_id", None)
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        stop_ids = list(dict.fromkeys([*configured, *self._stop_ids(decoding)]))  # the model's own EOS ids too
        if decoding.stop_at_newline:
            kwargs["eos_token_id"] = stop_ids
        if any(floors):
            kwargs["logits_processor"] = _min_new_tokens(start_at, floors, stop_ids)
        if decoding.stop_loops:
            kwargs["stopping_criteria"] = _loop_stop(start_at, prompts, self.tokenizer.pad_token_id)
        if decoding.stop:  # StopStringCriteria tokenizes with it, inside the generation's lock
            kwargs.update(stop_strings=list(decoding.stop), tokenizer=self.tokenizer)
        return kwargs

    def _speedup_kwargs(self, decoding: Decoding, n_texts: int, streamer: TokenStream | None, constrained: bool) -> dict[str, Any]:
        """A streamer, or prompt-lookup drafts for greedy batch-1 rewrites (exact there, and only there)."""
        if streamer is not None:
            return {"streamer": streamer}
        if self.prompt_lookup_tokens and n_texts == 1 and decoding.num_candidates == 1 and not decoding.do_sample and not constrained:
            return {"prompt_lookup_num_tokens": self.prompt_lookup_tokens}
        return {}

    def _cache_kwargs(self, input_ids: Any, decoding: Decoding, prefix: Sequence[int], rows: int) -> dict[str, Any]:
        """The KV cache to decode on: a copy of the template prefix's (batch 1), a reused static one, or generate's own.
        Called under the generation's lock: the prefix and static caches are shared state."""
        if self.reuse_prefix and rows == 1 and _starts_with(input_ids[0].tolist(), prefix):
            return {self._cache_arg: self._prefix_kv_copy(tuple(prefix))}
        if self.static_cache_len and input_ids.shape[1] + decoding.max_new_tokens <= self.static_cache_len:
            return self.static_cache_kwargs(rows)
        return {}

    def _new_rows(self, output: Any, start_at: int, prompts: list[list[int]], decoding: Decoding) -> tuple[list[list[int]], list[int | None]]:
        """Each row's new ids without padding, cut where it fell into a loop; and where each was cut."""
        pad = self.tokenizer.pad_token_id
        # Prompt-lookup drafts can be accepted past max_new_tokens (transformers 4.57): clip to the budget.
        rows = [[t for t in row if t != pad] for row in output[:, start_at : start_at + decoding.max_new_tokens].tolist()]
        cuts = [loop_cut(row, prompt) for row, prompt in zip(rows, prompts)] if decoding.stop_loops else [None] * len(rows)
        return [row if at is None else row[:at] for row, at in zip(rows, cuts)], cuts

    @property
    def _cache_arg(self) -> str:
        """The KV cache's argument name: ``cache`` from transformers 5.2x on (``past_key_values`` warns there)."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def forget_prefix(self) -> None:
        self._prefix_kv = None

    def static_cache_kwargs(self, rows: int) -> dict[str, Any]:
        """generate() arguments for a decode on this batch size's StaticCache, compiled where transformers can."""
        from transformers import StaticCache
        from transformers.generation import CompileConfig

        cache = self._static_caches.get(rows)
        if cache is None:
            cache = self._static_caches[rows] = StaticCache(config=self.model.config, max_cache_len=self.static_cache_len)
        else:
            cache.reset()
        if self.model.device.type != "cuda":  # transformers compiles the decode step on CUDA only
            return {self._cache_arg: cache}
        return {self._cache_arg: cache, "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")}

    def _prefix_kv_copy(self, prefix: tuple[int, ...]) -> Any:
        """A private copy of the prefix's KV cache (generate extends the cache it is given).

        The prefix is prefilled alone on a cold start too, so a rewrite computes the same numbers
        whether the cache was warm or not: greedy outputs are identical.
        """
        import copy

        import torch
        from transformers import DynamicCache

        if self._prefix_kv is None or self._prefix_kv[0] != prefix:
            cache = DynamicCache()
            self.model(input_ids=torch.tensor([prefix], device=self.model.device), use_cache=True, **{self._cache_arg: cache})
            self._prefix_kv = (prefix, cache)
        return copy.deepcopy(self._prefix_kv[1])


@functools.cache
def _lookup_keeps_prefix_cache() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def _starts_with(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    return 0 < len(prefix) < len(ids) and list(ids[: len(prefix)]) == list(prefix)


def _loop_stop(start_at: int, prompts: list[list[int]], pad: int | None) -> Any:
    """A stopping criterion that ends each row once :func:`loop_cut` finds a loop in what it generated."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class LoopStop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            rows = input_ids[:, start_at:].tolist()
            done = [loop_cut([t for t in row if t != pad], prompt) is not None for row, prompt in zip(rows, prompts)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]

    return StoppingCriteriaList([LoopStop()])


def _min_new_tokens(start_at: int, floors: list[int], stop_ids: list[int]) -> Any:
    """A logits processor holding back each row's stop tokens until it has ``floors[row]`` new tokens
    (transformers' ``min_length`` does this for one length per batch; a batch of prompts has one each)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class MinNewTokens(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            made = input_ids.shape[1] - start_at
            short = [row for row, floor in enumerate(floors) if made < floor]
            if short and stop_ids:
                rows = torch.tensor(short, device=scores.device)[:, None]
                scores = scores.clone()
                scores[rows, torch.tensor(stop_ids, device=scores.device)[None, :]] = -float("inf")
            return scores

    return LogitsProcessorList([MinNewTokens()])


def _load_weights(source: str, kwargs: dict[str, Any], dtype: str, device: str | None, adapter: str | Path | None) -> tuple[Any, Any]:
    """(model, tokenizer) from a folder or hub id, a LoRA adapter merged in; a ModelLoadError that says why not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bpo_plugins.quiet import quiet_libraries

    try:
        with quiet_libraries(("transformers",)):  # transformers 5's per-load "Loading weights" bar
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=_pick_dtype(dtype, device), **kwargs)
    except (OSError, ValueError) as exc:
        hint = "" if Path(source).expanduser().exists() else " (not a local folder; offline machines need a local path)"
        raise ModelLoadError(f"cannot load optimizer model {source!r}{hint}: {exc}") from exc
    if adapter is not None:
        from peft import PeftModel

        with quiet_libraries(("transformers",)):  # peft reads transformers 5's deprecated is_gradient_checkpointing
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model, tokenizer


def _revision(source: str, revision: str | None, model: Any, adapter: str | Path | None) -> str:
    """What identifies these weights in cache keys: a local folder's (and adapter's) fingerprint, else the hub commit."""
    local = Path(source).expanduser()
    if local.is_dir():
        return folder_revision(local) + ("" if adapter is None else "+" + folder_revision(Path(adapter)))
    return revision or getattr(model.config, "_commit_hash", None) or "main"


def _pick_dtype(dtype: str, device: str | None) -> Any:
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    # bf16 matmuls are slow on most CPUs; fp16/bf16 pay off on GPUs only.
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.bfloat16
    return torch.float32
