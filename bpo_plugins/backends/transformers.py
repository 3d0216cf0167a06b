"""Local causal LMs through Hugging Face transformers: THUDM/BPO, the bundled bpo-small, any chat model."""

from __future__ import annotations

import hashlib
import threading
import time
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.decoding import Decoding, cut_at_stop, loop_cut
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate, pick_local_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


#: Tokens of prompt plus rewrite the GPU path's static KV cache holds; longer inputs decode on a dynamic cache.
STATIC_CACHE_LEN = 2048


def folder_revision(folder: Path) -> str:
    """A cheap fingerprint of local weights, so a cache never serves a retrained model's rewrites."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in {".safetensors", ".bin", ".json", ".gguf", ".onnx", ".model"}:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "local-" + digest.hexdigest()[:16]


def batch_output(
    decoded: Sequence[str], counts: Sequence[int], n: int, *, elapsed: float, timed_out: bool, input_tokens: int,
    cut: Sequence[bool] = (),
) -> BatchOutput:
    """Group a flat list of ``len(prompts) * n`` decoded rows back into one Generation per prompt."""
    cut = list(cut) or [False] * len(decoded)
    generations = [
        Generation(texts=list(decoded[i : i + n]), output_tokens=int(sum(counts[i : i + n])), loops_cut=sum(cut[i : i + n]))
        for i in range(0, len(decoded), n)
    ]
    return BatchOutput(
        generations=generations,
        timed_out=timed_out,
        stats={"generate_s": elapsed, "output_tokens": int(sum(counts)), "input_tokens": input_tokens},
    )


class LocalBackend(Backend):
    """A local model with a Hugging Face tokenizer: rendering, chat and banned-word ids are shared here,
    so each local runtime (transformers, ONNX Runtime GenAI) only implements :meth:`generate_texts`."""

    tokenizer: PreTrainedTokenizerBase

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, model_id: str, revision: str, template: PromptTemplate | None) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.default_template = template or pick_local_template(model_id, bool(tokenizer.chat_template))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Held for each generation and for every use of the tokenizer: a fast tokenizer is one Rust
        # object that refuses concurrent use ("Already borrowed"). Re-entrant: generation tokenizes too.
        self._lock = threading.RLock()
        self._banned_ids: dict[tuple[str, ...], list[list[int]] | None] = {}
        self._prefix_ids: dict[tuple[PromptTemplate, bool], tuple[int, ...]] = {}
        #: Start batch-1 rewrites from the template prefix's KV cache, where the runtime can keep one.
        self.reuse_prefix = True

    def render(self, prompt: str, template: PromptTemplate) -> str:
        return template.render(prompt, self.tokenizer)

    def forget_prefix(self) -> None:
        """Free the template prefix's KV cache, where the runtime keeps one; the next rewrite rebuilds it."""

    def generate(
        self, prompts: Sequence[str], template: PromptTemplate, decoding: Decoding, timeout_s: float | None
    ) -> BatchOutput:
        # Chat templates already carry their special tokens; raw templates need the tokenizer's BOS.
        special = template.raw is not None
        return self.generate_texts([self.render(p, template) for p in prompts], decoding, timeout_s, special,
                                   prefix=self.template_prefix(template, special))

    def template_prefix(self, template: PromptTemplate, add_special_tokens: bool) -> tuple[int, ...]:
        """The token ids every rewrite with ``template`` starts with: the chat header and BPO's instruction.

        Runtimes that can keep a KV cache (:class:`KVPrefixCache`) compute them once per loaded model.
        The last token of the rendered prefix is left out: BPE may merge it with the prompt's first
        characters, and a prefix that is not a prefix of the prompt's ids would change its tokens.
        """
        key = (template, add_special_tokens)
        if key not in self._prefix_ids:
            marker = "\uE000"  # a private-use character: no template or tokenizer treats it specially
            rendered = self.render(marker, template)
            head = rendered.split(marker)[0] if rendered.count(marker) == 1 else ""
            with self._lock:
                ids = self.tokenizer(head, add_special_tokens=add_special_tokens)["input_ids"] if head else []
            self._prefix_ids[key] = tuple(ids[:-1])
        return self._prefix_ids[key]

    def chat(self, messages: Sequence[dict[str, str]], decoding: Decoding, timeout_s: float | None = None) -> BatchOutput:
        """Answer one chat conversation (what ``bpo serve`` exposes as /v1/chat/completions)."""
        return self.generate_texts([self.render_chat(messages)], decoding, timeout_s, add_special_tokens=False)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return str(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))

    def stream(self, text: str, decoding: Decoding, cancel: threading.Event, add_special_tokens: bool = False) -> TokenStream:
        """Continue one rendered text, yielding text pieces as tokens arrive (one candidate).

        Generation runs on its own thread; setting ``cancel`` stops it at the next token, so a
        client that hangs up frees the model at once.
        """
        stream = TokenStream(self.tokenizer, cancel)

        def run() -> None:
            try:
                self.generate_texts([text], replace(decoding, num_candidates=1), None, add_special_tokens, streamer=stream)
            except GenerationCancelled:
                pass
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                stream.error = exc
            finally:
                stream.end()

        threading.Thread(target=run, name="bpo-stream", daemon=True).start()
        return stream

    @abstractmethod
    def generate_texts(
        self, texts: Sequence[str], decoding: Decoding, timeout_s: float | None, add_special_tokens: bool,
        streamer: TokenStream | None = None, prefix: Sequence[int] = (),
    ) -> BatchOutput:
        """Continue each fully rendered text with ``decoding.num_candidates`` generations.

        With ``streamer`` (one text, one candidate) each new token id is also ``put`` to it as it
        is sampled, the prompt's ids first, as transformers' streamers expect. ``prefix`` is the
        ids a text is known to start with (:meth:`template_prefix`); a runtime may reuse their KV cache.
        """

    def _banned(self, words: tuple[str, ...]) -> list[list[int]] | None:
        """Token-id sequences of each banned word, bare and after a space (how BPE splits it mid-text)."""
        if words not in self._banned_ids:
            ids: list[list[int]] = []
            for word in words:
                for variant in (word, " " + word):
                    with self._lock:
                        tokens = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
                    if tokens and tokens not in ids:
                        ids.append(tokens)
            self._banned_ids[words] = ids or None
        return self._banned_ids[words]


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
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - torch and transformers are core dependencies
            raise ModelLoadError(f"the transformers backend needs torch and transformers: {exc}") from exc
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device} needs a GPU and a CUDA build of torch; this one has none (torch {torch.__version__})")
        source = str(name_or_path)
        local = Path(source).expanduser()
        kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            torch_dtype = _pick_dtype(dtype, device)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        except (OSError, ValueError) as exc:
            hint = "" if local.exists() else " (not a local folder; offline machines need a local path)"
            raise ModelLoadError(f"cannot load optimizer model {source!r}{hint}: {exc}") from exc
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        if local.is_dir():
            rev = folder_revision(local) + ("" if adapter is None else "+" + folder_revision(Path(adapter)))
        else:
            rev = revision or getattr(model.config, "_commit_hash", None) or "main"
        if device.startswith("cuda"):
            # Batch-1 decode on a GPU is bound by reading the weights once per token: a static KV cache
            # lets transformers compile the decode step into CUDA graphs (no per-token Python or kernel
            # launch overhead).
            return cls(model, tokenizer, model_id=model_id or source, revision=rev, template=template,
                       static_cache_len=STATIC_CACHE_LEN)
        return cls(model, tokenizer, model_id=model_id or source, revision=rev, template=template)

    def generate_texts(
        self, texts: Sequence[str], decoding: Decoding, timeout_s: float | None, add_special_tokens: bool,
        streamer: TokenStream | None = None, prefix: Sequence[int] = (),
    ) -> BatchOutput:
        import torch

        with self._lock:
            batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        batch = batch.to(self.model.device)
        n = decoding.num_candidates
        reuse = self.reuse_prefix and len(texts) == 1 and n == 1 and _starts_with(batch["input_ids"][0].tolist(), prefix)
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
        banned = self._banned(decoding.banned_words)
        if banned:
            kwargs["bad_words_ids"] = banned
        if timeout_s is not None:
            kwargs["max_time"] = timeout_s
        pad = self.tokenizer.pad_token_id
        start_at = batch["input_ids"].shape[1]
        prompts: list[list[int]] = []  # per output row, for the loop stop's prompt-copy check
        if decoding.stop_loops:
            prompts = [[t for t in row if t != pad] for row in batch["input_ids"].tolist() for _ in range(n)]
            kwargs["stopping_criteria"] = _loop_stop(start_at, prompts, pad)
        if decoding.stop:  # StopStringCriteria tokenizes with it, inside the lock below
            kwargs.update(stop_strings=list(decoding.stop), tokenizer=self.tokenizer)
        if streamer is not None:
            kwargs["streamer"] = streamer
        elif self.prompt_lookup_tokens and len(texts) == 1 and n == 1 and not decoding.do_sample and not banned:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup_tokens
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            if reuse:
                kwargs["past_key_values"] = self._prefix_kv_copy(tuple(prefix))
            elif self.static_cache_len and start_at + decoding.max_new_tokens <= self.static_cache_len:
                kwargs.update(self.static_cache_kwargs(len(texts) * n))
            output = self.model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
        # Prompt-lookup drafts can be accepted past max_new_tokens (transformers 4.57): clip to the budget.
        rows = [[t for t in row if t != pad] for row in output[:, start_at : start_at + decoding.max_new_tokens].tolist()]
        cuts = [loop_cut(row, prompt) for row, prompt in zip(rows, prompts)] if decoding.stop_loops else [None] * len(rows)
        rows = [row if at is None else row[:at] for row, at in zip(rows, cuts)]
        with self._lock:
            decoded = [cut_at_stop(text, decoding.stop) for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        return batch_output(decoded, [len(row) for row in rows], n, elapsed=elapsed,
                            timed_out=timeout_s is not None and elapsed >= timeout_s,
                            input_tokens=int(batch["input_ids"].numel()), cut=[at is not None for at in cuts])

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
            return {"past_key_values": cache}
        return {"past_key_values": cache, "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")}

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
            self.model(input_ids=torch.tensor([prefix], device=self.model.device), past_key_values=cache, use_cache=True)
            self._prefix_kv = (prefix, cache)
        return copy.deepcopy(self._prefix_kv[1])


def _starts_with(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    return 0 < len(prefix) < len(ids) and list(ids[: len(prefix)]) == list(prefix)


class GenerationCancelled(Exception):
    """Raised inside a generation whose stream was cancelled, to stop it at the next token."""


class TokenStream:
    """A streamer for one generation: transformers' ``put``/``end`` protocol in, text pieces out.

    It wraps transformers' ``TextIteratorStreamer`` (which decodes word-safe pieces) and adds
    cancellation, a token count for usage reports, and the generation thread's error.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cancel: threading.Event) -> None:
        from transformers import TextIteratorStreamer

        self._text = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.cancel = cancel
        self.tokens = 0
        self.prompt_tokens = 0
        self.error: BaseException | None = None
        self._ended = False

    def put(self, value: Any) -> None:
        if self.cancel.is_set():
            raise GenerationCancelled()
        count = len(value.reshape(-1)) if hasattr(value, "reshape") else len(value)
        if self._text.next_tokens_are_prompt:
            self.prompt_tokens = count
        else:
            self.tokens += count
        self._text.put(value)

    def end(self) -> None:
        if not self._ended:  # transformers' generate ends the stream itself; the thread ends it again
            self._ended = True
            self._text.end()

    def __iter__(self) -> Iterator[str]:
        for piece in self._text:
            if piece:
                yield piece
        if self.error is not None:
            raise self.error


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


def _pick_dtype(dtype: str, device: str | None) -> Any:
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    # bf16 matmuls are slow on most CPUs; fp16/bf16 pay off on GPUs only.
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.bfloat16
    return torch.float32
