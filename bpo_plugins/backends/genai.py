"""ONNX Runtime GenAI: an export built by onnxruntime-genai's model builder (``bpo export onnx --engine genai``).

The builder fuses each decoder layer into a handful of contrib ops (GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits) and GenAI runs the decode loop in C++ with a
preallocated KV cache. On a 135M model, where per-op overhead rather than arithmetic sets the pace,
that is 3-5x the tokens per second of the optimum graph under ``transformers.generate``.

This file only turns token ids into tokens: prompts are rendered and tokenised by the shared
:class:`LocalBackend`, and modes, guards and batching policy stay in the Rewriter.
"""

from __future__ import annotations

import atexit
import json
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bpo_plugins.backends.base import BatchOutput, usable_cores
from bpo_plugins.backends.local import LocalBackend, TokenStream, _batch_output, folder_revision
from bpo_plugins.decoding import Decoding, loop_cut
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate

__all__ = ["INSTALL_HINT", "GenAIBackend", "KVPrefixCache", "genai_available", "load_genai_model"]

INSTALL_HINT = "the genai engine needs onnxruntime-genai: pip install 'bpo-plugins[onnx]'"


def genai_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def load_genai_model(folder: str | Path, device: str | None = None) -> Any:
    """An ``og.Model`` for an export folder, on CUDA where GenAI has it, with a thread per usable core."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ModelLoadError(INSTALL_HINT) from exc
    if device == "cuda" and not og.is_cuda_available():
        raise ModelLoadError("--device cuda needs onnxruntime-genai-cuda and a GPU (pip install 'bpo-plugins[gpu]')")
    try:
        config = og.Config(str(folder))
        # GenAI's sessions run one intra-op thread unless told otherwise; on 2 cores, two threads
        # decode 1.6x and prefill 1.9x faster (benchmarks/RESULTS.md, "a GenAI thread per core").
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": usable_cores()}}}}))
        if device == "cuda" or (device is None and og.is_cuda_available()):
            config.clear_providers()
            config.append_provider("cuda")
        elif device == "cpu":
            config.clear_providers()
        return og.Model(config)
    except Exception as exc:  # onnxruntime-genai raises plain RuntimeError/OSError for broken folders
        raise ModelLoadError(f"cannot load the GenAI export in {folder}: {exc}") from exc


class GenAIBackend(LocalBackend):
    # Batch 8 over batch 1 on the int8 export, 2 cores: 0.86x (benchmarks/RESULTS.md): one prompt at
    # a time gets the template's KV cache and prompt lookup, so callers should not wait to batch.
    batch_speedup = 1.0
    name = "onnx-genai"

    def __init__(self, model: Any, tokenizer: Any, *, pad_token_id: int, model_id: str, revision: str,
                 template: PromptTemplate | None) -> None:
        super().__init__(tokenizer, model_id=model_id, revision=revision, template=template)
        self.model = model
        # GenAI masks every occurrence of its configured pad id, so a batch can only be padded with an
        # id its prompts never contain (the export picks one; see export.onnx.genai_pad_token_id).
        self.pad_token_id = pad_token_id
        self._prefix_cache = KVPrefixCache(model)
        #: Draft tokens per step of greedy batch-1 decoding (prompt lookup); 0 turns it off.
        self.prompt_lookup_tokens = 5
        _release_at_exit(self)

    def close(self) -> None:
        """Release the GenAI model, its cached generator and the tokenizer now. GenAI counts the models
        still alive when the process ends and prints ``OGA Error: ... were leaked`` for each, and a
        backend held by a module global or a daemon thread is only collected after that count; so every
        backend is closed at interpreter exit too. A closed backend cannot generate."""
        self._prefix_cache.clear()
        self._prefix_cache.model = None
        self.model = None
        self.tokenizer = None

    @classmethod
    def load_export(cls, folder: str | Path, *, model_id: str, template: PromptTemplate | None, device: str | None = None) -> GenAIBackend:
        from transformers import AutoTokenizer

        folder = Path(folder)
        model = load_genai_model(folder, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
        except Exception as exc:  # a folder with a broken tokenizer or config
            raise ModelLoadError(f"cannot load the GenAI export in {folder}: {exc}") from exc
        return cls(model, tokenizer, pad_token_id=int(pad), model_id=model_id, revision=folder_revision(folder),
                   template=template)

    def generate_texts(
        self, texts: Sequence[str], decoding: Decoding, timeout_s: float | None, add_special_tokens: bool,
        streamer: TokenStream | None = None, prefix: Sequence[int] = (), min_new: Sequence[int] = (),
    ) -> BatchOutput:
        import numpy as np

        n = decoding.num_candidates
        with self._lock:
            rows = [ids for ids in self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"] for _ in range(n)]
        floors = [m for m in min_new for _ in range(n)] or [0] * len(rows)
        pad = self.pad_token_id
        if len(rows) > 1 and any(pad in ids for ids in rows):
            return self._rows_alone(texts, decoding, timeout_s, add_special_tokens, prefix, min_new, rows)
        banned = self._banned(decoding.banned_words) or []
        start = time.perf_counter()
        deadline = None if timeout_s is None else start + timeout_s
        with self._lock:
            stop_ids = self._stop_ids(decoding)
            newline = set(stop_ids) - {self.tokenizer.eos_token_id}
            rows_out = _Outputs(rows, decoding, {pad, *stop_ids}, streamer, self.tokenizer, floors, newline)
            reuse = self.reuse_prefix and len(rows) == 1
            generator = self._prefix_cache.resume(rows[0], tuple(prefix), decoding) if reuse else None
            if generator is None:
                generator = self._new_generator(rows, decoding)
            if streamer is not None:
                streamer.put(np.asarray(rows[0]))
            plain = not (decoding.do_sample or banned or any(floors) or decoding.stop_at_newline)
            if len(rows) == 1 and plain and self.prompt_lookup_tokens:
                timed_out = self._decode_with_drafts(generator, rows_out, deadline)
            else:
                timed_out = self._decode(generator, rows_out, banned, deadline)
        if streamer is not None:
            streamer.end()
        elapsed = time.perf_counter() - start
        return _batch_output(self._decode_rows(rows_out.out, decoding), [len(ids) for ids in rows_out.out], n,
                             elapsed=elapsed, timed_out=timed_out, input_tokens=sum(len(ids) for ids in rows), cut=rows_out.cut)

    def _rows_alone(self, texts: Sequence[str], decoding: Decoding, timeout_s: float | None, add_special_tokens: bool,
                    prefix: Sequence[int], min_new: Sequence[int], rows: list[list[int]]) -> BatchOutput:
        """Padding would mask real tokens of these prompts: run every row (candidates too) alone."""
        n, single = decoding.num_candidates, replace(decoding, num_candidates=1)
        parts = [self.generate_texts([text], single, timeout_s, add_special_tokens, prefix=prefix,
                                     min_new=[min_new[i]] if min_new else ())
                 for i, text in enumerate(texts) for _ in range(n)]
        return _batch_output([part.generations[0].texts[0] for part in parts],
                             [part.generations[0].output_tokens for part in parts], n,
                             elapsed=sum(part.stats["generate_s"] for part in parts),
                             timed_out=any(part.timed_out for part in parts), input_tokens=sum(len(ids) for ids in rows),
                             cut=[part.generations[0].loops_cut > 0 for part in parts])

    def _decode(self, generator: Any, rows: _Outputs, banned: list[list[int]], deadline: float | None) -> bool:
        """GenAI's own search, a token per step for the whole batch; True when the deadline cut it."""
        while not generator.is_done() and not all(rows.finished):
            if banned or rows.holding():
                self._mask(generator, rows, banned)
            generator.generate_next_token()
            for i, token in enumerate(generator.get_next_tokens().tolist()):
                rows.take(i, int(token))
            if deadline is not None and time.perf_counter() >= deadline:
                return True
        return False

    def _decode_with_drafts(self, generator: Any, rows: _Outputs, deadline: float | None) -> bool:
        """Greedy prompt-lookup decoding at batch 1: a rewrite copies spans of its prompt, so after each
        token the span that followed the same n-gram in the prompt is appended as a draft and checked in
        the same forward pass; the longest agreeing run is kept and the rest rewound.

        Each step computes the argmax over ``get_output("logits")`` itself, so warm and cold starts
        take the same path and give the same rewrite.
        """
        import numpy as np

        context = list(rows.prompts[0])
        token = int(np.argmax(generator.get_logits()[0, -1]))
        while not rows.take(0, token):
            # No draft past the token budget: the generator has room for exactly that many tokens.
            room = rows.decoding.max_new_tokens - len(rows.out[0])
            draft = _lookup(context + rows.out[0], min(self.prompt_lookup_tokens or 0, room))
            generator.append_tokens(np.asarray([[token, *draft]], dtype=np.int32))
            predicted = np.argmax(generator.get_output("logits")[0], axis=-1).tolist()
            kept = 0
            while kept < len(draft) and predicted[kept] == draft[kept]:
                kept += 1
            if kept < len(draft):
                generator.rewind_to(generator.token_count() - (len(draft) - kept))
            finished = False
            for accepted in draft[:kept]:
                if (finished := rows.take(0, accepted)):
                    break
            if finished or (deadline is not None and time.perf_counter() >= deadline):
                return not finished
            token = predicted[kept]
        return False

    def forget_prefix(self) -> None:
        self._prefix_cache.clear()

    def _new_generator(self, rows: list[list[int]], decoding: Decoding) -> Any:
        """A generator holding ``rows`` (padded on the right, as GenAI expects), ready to decode."""
        import numpy as np
        import onnxruntime_genai as og

        width = max(len(ids) for ids in rows)
        batch = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        for i, ids in enumerate(rows):
            batch[i, : len(ids)] = ids
        generator = og.Generator(self.model, _search_params(self.model, decoding, max_length=width + decoding.max_new_tokens,
                                                          batch_size=len(rows)))
        generator.append_tokens(batch)
        return generator

    @staticmethod
    def _mask(generator: Any, rows: _Outputs, banned: list[list[int]]) -> None:
        """Forbid the last token of a banned sequence wherever the rest of it was just generated (what
        ``bad_words_ids`` does in transformers), and the stop tokens of rows still short of their minimum."""
        logits = generator.get_logits()
        changed = False
        for i, tokens in enumerate(rows.out):
            for sequence in banned:
                prefix = sequence[:-1]
                if not prefix or tokens[-len(prefix) :] == prefix:
                    logits[i, -1, sequence[-1]] = -float("inf")
                    changed = True
            if not rows.finished[i] and len(tokens) < rows.floors[i]:
                logits[i, -1, rows.stop_ids] = -float("inf")
                changed = True
        if changed:
            generator.set_logits(logits)


_open_backends: weakref.WeakSet[GenAIBackend] = weakref.WeakSet()


def _release_at_exit(backend: GenAIBackend) -> None:
    # Python's atexit runs before the C++ static destructors where GenAI counts its live models, and
    # in reverse order of registration: registered again here, after onnxruntime_genai was imported,
    # the release runs before anything that module registered.
    atexit.unregister(_close_open_backends)
    atexit.register(_close_open_backends)
    _open_backends.add(backend)


def _close_open_backends() -> None:
    for backend in list(_open_backends):
        backend.close()
    _open_backends.clear()


def _search_params(model: Any, decoding: Decoding, *, max_length: int, batch_size: int) -> Any:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    options: dict[str, Any] = {"max_length": max_length, "batch_size": batch_size, "do_sample": decoding.do_sample}
    if decoding.do_sample:
        options.update(temperature=decoding.temperature, top_p=decoding.top_p)
    params.set_search_options(**options)
    return params


class KVPrefixCache:
    """One live batch-1 generator whose KV cache already holds the template's prefix.

    Every rewrite starts with the same 40-50 tokens (the chat header, BPO's instruction). Instead of
    prefilling them on each call, the generator is rewound to the end of the prefix and only the
    user's prompt is appended. The prefix is always prefilled alone, on a cold start too, so a rewrite
    computes the same numbers whether the cache was warm or not: greedy outputs are identical.
    """

    #: The live generator's KV buffer is preallocated at this length (fp32, about 12 MB per 256
    #: tokens on bpo-small); longer rewrites start cold.
    MAX_LENGTH = 2048

    def __init__(self, model: Any) -> None:
        self.model = model
        self._key: tuple[Any, ...] | None = None
        self._generator: Any = None
        self.hits = 0
        self.misses = 0

    def resume(self, ids: Sequence[int], prefix: tuple[int, ...], decoding: Decoding) -> Any:
        """A generator holding ``ids`` whose first ``len(prefix)`` KV entries came from the cache;
        None when ``ids`` does not start with ``prefix`` or will not fit."""
        import numpy as np
        import onnxruntime_genai as og

        if not prefix or len(ids) <= len(prefix) or tuple(ids[: len(prefix)]) != prefix:
            return None
        if len(ids) + decoding.max_new_tokens > self.MAX_LENGTH:
            return None
        # Search options are fixed when a generator is made: one per decoding mode, the last one kept.
        key = (prefix, decoding.do_sample, decoding.temperature, decoding.top_p)
        try:
            if key != self._key:
                self.clear()  # free the old KV buffer before allocating the new one
                params = _search_params(self.model, decoding, max_length=self.MAX_LENGTH, batch_size=1)
                self._generator = og.Generator(self.model, params)
                self._generator.append_tokens(np.asarray([prefix], dtype=np.int32))
                self._key = key
                self.misses += 1
            else:
                self._generator.rewind_to(len(prefix))
                self.hits += 1
            self._generator.append_tokens(np.asarray([ids[len(prefix) :]], dtype=np.int32))
        except Exception:
            self.clear()  # a half-appended generator must never be resumed
            raise
        return self._generator

    def clear(self) -> None:
        self._key = self._generator = None



class _Outputs:
    """The tokens each row of a batch has generated, and whether it is done (end of sequence, a stop
    string, a loop cut, or its token budget)."""

    def __init__(self, prompts: list[list[int]], decoding: Decoding, eos: set[int], streamer: TokenStream | None,
                 tokenizer: Any, floors: Sequence[int] = (), newline: set[int] | None = None) -> None:
        self.prompts, self.decoding, self.eos, self.streamer, self.tokenizer = prompts, decoding, eos, streamer, tokenizer
        #: Each row's least number of new tokens; its stop tokens are masked until then (see GenAIBackend._mask).
        self.floors = list(floors) or [0] * len(prompts)
        self.stop_ids = sorted(eos)
        # A stop string spans at most as many tokens as it has characters: decode that much of the tail.
        self.stop_window = max((len(stop) for stop in decoding.stop), default=0) + 1
        self.out: list[list[int]] = [[] for _ in prompts]
        self.finished = [False] * len(prompts)
        self.cut = [False] * len(prompts)
        self.newline = newline or set()

    def holding(self) -> bool:
        """True while some unfinished row is still short of its minimum length."""
        return any(not done and len(out) < floor for done, out, floor in zip(self.finished, self.out, self.floors))

    def take(self, i: int, token: int) -> bool:
        """Add row ``i``'s next token; True once the row is finished."""
        import numpy as np

        if self.finished[i]:
            return True
        out = self.out[i]
        if token in self.eos:
            self.finished[i] = True
            if token in self.newline:  # kept: it may carry text before its line break (".\n"); the decode cuts there
                out.append(token)
            return True
        out.append(token)
        if self.streamer is not None:
            self.streamer.put(np.asarray([token]))
        if self.decoding.stop_loops and (at := loop_cut(out, self.prompts[i])) is not None:
            del out[at:]
            self.cut[i] = True
        self.finished[i] = self.cut[i] or len(out) >= self.decoding.max_new_tokens or self._stopped(out)
        return self.finished[i]

    def _stopped(self, out: list[int]) -> bool:
        if not self.decoding.stop:
            return False
        tail = self.tokenizer.decode(out[-self.stop_window :], skip_special_tokens=True)
        return any(stop in tail for stop in self.decoding.stop)


def _lookup(tokens: list[int], size: int, max_ngram: int = 3) -> list[int]:
    """Up to ``size`` tokens that followed the latest ``max_ngram``..1 tokens where they occurred
    before (the first such place); none when the tail never occurred."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + size]
    return []
