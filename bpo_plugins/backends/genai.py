"""ONNX Runtime GenAI: an export built by onnxruntime-genai's model builder (``bpo export onnx --engine genai``).

The builder fuses each decoder layer into a handful of contrib ops (GroupQueryAttention,
SkipSimplifiedLayerNormalization, MatMulNBits) and GenAI runs the decode loop in C++ with a
preallocated KV cache. On a 135M model, where per-op overhead rather than arithmetic sets the pace,
that is 3-5x the tokens per second of the optimum graph under ``transformers.generate``.

This file only turns token ids into tokens: prompts are rendered and tokenised by the shared
:class:`LocalBackend`, and modes, guards and batching policy stay in the Rewriter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bpo_plugins.backends.base import BatchOutput
from bpo_plugins.backends.transformers import LocalBackend, TokenStream, batch_output, folder_revision
from bpo_plugins.decoding import Decoding, loop_cut
from bpo_plugins.result import ModelLoadError
from bpo_plugins.templates import PromptTemplate

INSTALL_HINT = "the genai engine needs onnxruntime-genai: pip install 'bpo-plugins[onnx]'"


def genai_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


class GenAIBackend(LocalBackend):
    # Batch 8 over batch 1 on the int4 export, 2 cores: 0.99x (benchmarks/RESULTS.md). Its batch-1
    # decode is already fast and prefill is compute-bound, so callers should not wait to batch.
    batch_speedup = 1.0
    name = "onnx-genai"

    def __init__(self, model: Any, tokenizer: Any, *, pad_token_id: int, model_id: str, revision: str,
                 template: PromptTemplate | None) -> None:
        super().__init__(tokenizer, model_id=model_id, revision=revision, template=template)
        self.model = model
        # GenAI masks every occurrence of its configured pad id, so a batch can only be padded with an
        # id its prompts never contain (the export picks one; see export.onnx.genai_pad_token_id).
        self.pad_token_id = pad_token_id

    @classmethod
    def load_export(cls, folder: str | Path, *, model_id: str, template: PromptTemplate | None, device: str | None = None) -> GenAIBackend:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise ModelLoadError(INSTALL_HINT) from exc
        from transformers import AutoTokenizer

        folder = Path(folder)
        if device == "cuda" and not og.is_cuda_available():
            raise ModelLoadError("--device cuda needs onnxruntime-genai-cuda and a GPU (pip install 'bpo-plugins[gpu]')")
        try:
            config = og.Config(str(folder))
            if device == "cuda" or (device is None and og.is_cuda_available()):
                config.clear_providers()
                config.append_provider("cuda")
            elif device == "cpu":
                config.clear_providers()
            model = og.Model(config)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            pad = json.loads((folder / "genai_config.json").read_text())["model"]["pad_token_id"]
        except Exception as exc:  # onnxruntime-genai raises plain RuntimeError/OSError for broken folders
            raise ModelLoadError(f"cannot load the GenAI export in {folder}: {exc}") from exc
        return cls(model, tokenizer, pad_token_id=int(pad), model_id=model_id, revision=folder_revision(folder),
                   template=template)

    def generate_texts(
        self, texts: Sequence[str], decoding: Decoding, timeout_s: float | None, add_special_tokens: bool,
        streamer: TokenStream | None = None,
    ) -> BatchOutput:
        import numpy as np
        import onnxruntime_genai as og

        n = decoding.num_candidates
        rows = [ids for ids in self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"] for _ in range(n)]
        pad = self.pad_token_id
        if len(rows) > 1 and any(pad in ids for ids in rows):
            # Padding would mask real tokens of these prompts: run every row (candidates too) alone.
            single = replace(decoding, num_candidates=1)
            parts = [self.generate_texts([text], single, timeout_s, add_special_tokens) for text in texts for _ in range(n)]
            return batch_output([part.generations[0].texts[0] for part in parts],
                                [part.generations[0].output_tokens for part in parts], n,
                                elapsed=sum(part.stats["generate_s"] for part in parts),
                                timed_out=any(part.timed_out for part in parts), input_tokens=sum(len(ids) for ids in rows),
                                cut=[part.generations[0].loops_cut > 0 for part in parts])
        width = max(len(ids) for ids in rows)
        # GenAI masks pad tokens itself and expects batches padded on the right.
        batch = np.full((len(rows), width), pad, dtype=np.int32)
        for i, ids in enumerate(rows):
            batch[i, : len(ids)] = ids
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {
            "max_length": width + decoding.max_new_tokens,
            "batch_size": len(rows),
            "do_sample": decoding.do_sample,
        }
        if decoding.do_sample:
            options.update(temperature=decoding.temperature, top_p=decoding.top_p)
        params.set_search_options(**options)
        banned = self._banned(decoding.banned_words) or []
        eos = {self.tokenizer.eos_token_id, pad}
        out: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        cut = [False] * len(rows)
        start = time.perf_counter()
        deadline = None if timeout_s is None else start + timeout_s
        timed_out = False
        with self._lock:
            generator = og.Generator(self.model, params)
            generator.append_tokens(batch)
            if streamer is not None:
                streamer.put(np.asarray(rows[0]))
            while not generator.is_done() and not all(finished):
                if banned:
                    self._mask_banned(generator, out, banned)
                generator.generate_next_token()
                for i, token in enumerate(generator.get_next_tokens().tolist()):
                    if finished[i]:
                        continue
                    if token in eos:
                        finished[i] = True
                        continue
                    out[i].append(int(token))
                    if streamer is not None:
                        streamer.put(np.asarray([token]))
                    if decoding.stop_loops and (at := loop_cut(out[i], rows[i])) is not None:
                        del out[i][at:]
                        cut[i] = True
                    finished[i] = cut[i] or len(out[i]) >= decoding.max_new_tokens
                if deadline is not None and time.perf_counter() >= deadline:
                    timed_out = True
                    break
        if streamer is not None:
            streamer.end()
        elapsed = time.perf_counter() - start
        decoded = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return batch_output(decoded, [len(ids) for ids in out], n, elapsed=elapsed, timed_out=timed_out,
                            input_tokens=sum(len(ids) for ids in rows), cut=cut)

    @staticmethod
    def _mask_banned(generator: Any, out: list[list[int]], banned: list[list[int]]) -> None:
        """Forbid the last token of a banned sequence wherever the rest of it was just generated
        (what ``bad_words_ids`` does in transformers)."""
        logits = generator.get_logits()
        changed = False
        for i, tokens in enumerate(out):
            for sequence in banned:
                prefix = sequence[:-1]
                if not prefix or tokens[-len(prefix) :] == prefix:
                    logits[i, -1, sequence[-1]] = -float("inf")
                    changed = True
        if changed:
            generator.set_logits(logits)
