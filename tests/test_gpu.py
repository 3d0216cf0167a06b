"""The GPU runtime: transformers with a static KV cache, its decode step compiled into CUDA graphs.

CI has no GPU: the static-cache logic runs here on CPU (where transformers does not compile it), the
CUDA checks skip, and asking for CUDA without one is a clear error. Speed lives in
``benchmarks/gpu_decode.py``.
"""

from __future__ import annotations

import pytest
import torch

from bpo_plugins import ModelLoadError, Rewriter
from bpo_plugins.backends.transformers import TransformersBackend
from bpo_plugins.decoding import Decoding

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
PROMPTS = ["Explain gravity", "Tell me about cats, please", "Write a haiku about the sea"]


def _backend(folder, **options) -> TransformersBackend:
    loaded = TransformersBackend.load(folder, device="cpu")
    return TransformersBackend(loaded.model, loaded.tokenizer, model_id=loaded.model_id, template=loaded.default_template, **options)


def test_static_cache_decodes_what_the_dynamic_cache_decodes(tiny_bpo_dir):
    static = _backend(tiny_bpo_dir, static_cache_len=128)
    dynamic = _backend(tiny_bpo_dir, prompt_lookup_tokens=None, reuse_prefix=False)
    assert static.prompt_lookup_tokens is None and static.reuse_prefix is False  # both need a dynamic cache
    template = static.default_template
    greedy = Decoding(max_new_tokens=16)
    for prompt in PROMPTS:  # one cache per batch size, reset between calls
        assert static.generate([prompt], template, greedy, None).generations[0].texts == \
            dynamic.generate([prompt], template, greedy, None).generations[0].texts
    batch = static.generate(PROMPTS, template, greedy, None)
    assert [g.texts for g in batch.generations] == [g.texts for g in dynamic.generate(PROMPTS, template, greedy, None).generations]
    assert sorted(static._static_caches) == [1, 3]
    # An input longer than the static cache decodes on a dynamic one instead of failing.
    long = static.generate(["word " * 200], template, greedy, None)
    assert long.generations[0].output_tokens > 0


def test_cuda_without_a_gpu_is_a_clear_error(tiny_bpo_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="needs a GPU and a CUDA build of torch"):
        Rewriter.from_pretrained(tiny_bpo_dir, backend="transformers", device="cuda").warmup()


@needs_cuda
def test_bundled_optimizer_on_cuda_uses_the_compiled_static_cache():
    rewriter = Rewriter.from_pretrained("bpo-small", device="cuda", cache_size=0, max_new_tokens=48)
    first = [rewriter.rewrite(p) for p in PROMPTS]
    backend = rewriter.backend
    assert backend.static_cache_len and backend.model.dtype == torch.bfloat16 and 1 in backend._static_caches
    again = [rewriter.rewrite(p) for p in PROMPTS]  # the compiled step and its cache are reused
    assert [r.candidates for r in first] == [r.candidates for r in again]
    assert all(r.rewritten.strip() for r in first)
