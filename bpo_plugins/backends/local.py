"""What every local runtime shares: a Hugging Face tokenizer, rendering, streaming, and the token ids a
decoding names (banned words, the newline, a minimum length), so a runtime (transformers, optimum's ONNX
graph, ONNX Runtime GenAI) only implements :meth:`LocalBackend.generate_texts`."""

from __future__ import annotations

import hashlib
import threading
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpo_plugins.backends.base import Backend, BatchOutput, Generation
from bpo_plugins.decoding import Decoding, cut_at_newline, cut_at_stop, fit_minimum
from bpo_plugins.templates import PromptTemplate, pick_local_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["GenerationCancelled", "LocalBackend", "TokenStream", "folder_revision"]


def folder_revision(folder: Path) -> str:
    """A cheap fingerprint of local weights, so a cache never serves a retrained model's rewrites."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in {".safetensors", ".bin", ".json", ".gguf", ".onnx", ".model"}:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "local-" + digest.hexdigest()[:16]


def _batch_output(
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
    """A local model with a Hugging Face tokenizer: rendering, chat and the token ids a decoding names
    are shared here, so each local runtime only implements :meth:`generate_texts`."""

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
        self._newline: tuple[int, ...] | None = None
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
        decoding, min_new = fit_minimum(decoding, self.min_new_tokens(prompts, decoding))
        return self.generate_texts([self.render(p, template) for p in prompts], decoding, timeout_s, special,
                                   prefix=self.template_prefix(template, special), min_new=min_new)

    def min_new_tokens(self, prompts: Sequence[str], decoding: Decoding) -> list[int]:
        """Each prompt's least number of new tokens: BPO's aggressive ``min_length``.

        thu-coai/BPO's ``infer_example.py`` sets ``min_length = len(ids(template(text))) + len(ids(text)) + 5``;
        ``min_length`` counts the input too, so the new tokens must number ``len(ids(text)) + 5``, the
        user's prompt tokenised as the reference does (with the tokenizer's special tokens).
        """
        if decoding.min_tokens_over_prompt is None:
            return []
        with self._lock:
            counts = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        return [count + decoding.min_tokens_over_prompt for count in counts]

    def newline_ids(self) -> tuple[int, ...]:
        """The ids of every token whose text holds a newline, read off this model's own vocabulary.

        Llama's tokenizer has one (``<0x0A>``, the 13 of BPO's ``eos_token_id=[eos, 13]``); byte-level
        BPE vocabularies also merge newlines with text (``.\\n``, ``\\n\\n``), and each of those ends a line too.
        """
        if self._newline is None:
            with self._lock:
                texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._newline = tuple(i for i, text in enumerate(texts) if "\n" in text)
        return self._newline

    def template_prefix(self, template: PromptTemplate, add_special_tokens: bool) -> tuple[int, ...]:
        """The token ids every rewrite with ``template`` starts with: the chat header and BPO's instruction.

        Runtimes that can keep a KV cache compute them once per loaded model. The last token of the
        rendered prefix is left out: BPE may merge it with the prompt's first characters, and a
        prefix that is not a prefix of the prompt's ids would change its tokens.
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
        streamer: TokenStream | None = None, prefix: Sequence[int] = (), min_new: Sequence[int] = (),
    ) -> BatchOutput:
        """Continue each fully rendered text with ``decoding.num_candidates`` generations.

        With ``streamer`` (one text, one candidate) each new token id is also ``put`` to it as it
        is sampled, the prompt's ids first, as transformers' streamers expect. ``prefix`` is the
        ids a text is known to start with (:meth:`template_prefix`); a runtime may reuse their KV cache.
        ``min_new`` is each text's least number of new tokens (:meth:`min_new_tokens`): until a row
        has that many, its end-of-sequence and newline tokens cannot be sampled.
        """

    def _decode_rows(self, rows: Sequence[Sequence[int]], decoding: Decoding) -> list[str]:
        """Generated ids to text, cut at the decoding's stop strings and, when it stops there, its first newline."""
        with self._lock:
            texts = [cut_at_stop(text, decoding.stop) for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
        return [cut_at_newline(text) for text in texts] if decoding.stop_at_newline else texts

    def _stop_ids(self, decoding: Decoding) -> list[int]:
        """Ids that end a row: end of sequence, and each newline token when the decoding stops there."""
        eos = self.tokenizer.eos_token_id
        ids = [] if eos is None else [int(eos)]
        if decoding.stop_at_newline:
            ids += [i for i in self.newline_ids() if i not in ids]
        return ids

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
