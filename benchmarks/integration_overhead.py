"""Each framework integration's overhead over a direct ``Rewriter`` call, rewriter work taken out.

The rewriter's own work is taken out by warming its greedy cache first: every timed call is a
cache hit, so what differs between "direct" and an integration is the adapter alone.

    python benchmarks/integration_overhead.py [--model PATH|bpo-small] [--n 2000] [--out overhead.json]

Target (issue 3): at most 1 ms p50 per integration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPTS = [f"Explain topic number {i} to a curious student." for i in range(16)]


def timed(call: Callable[[str], Any], n: int) -> list[float]:
    samples = []
    for i in range(n):
        prompt = PROMPTS[i % len(PROMPTS)]
        start = time.perf_counter()
        call(prompt)
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bpo-small")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("integration_overhead.json"))
    args = parser.parse_args()

    import dspy
    from langchain.agents.middleware import ModelRequest
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.messages import HumanMessage

    from bpo_plugins import Rewriter
    from bpo_plugins.dspy import BPO
    from bpo_plugins.langchain import BPOMiddleware, BPORewriter
    from bpo_plugins.llama_index import BPOQueryTransform

    rewriter = Rewriter.from_pretrained(args.model, max_new_tokens=16)
    rewriter.rewrite_batch(PROMPTS)  # warm the cache: the model's work is out of every timed call

    class Echo(dspy.Module):
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(answer=question)

    runnable = BPORewriter(rewriter=rewriter)
    transform = BPOQueryTransform(rewriter)
    program = BPO(Echo(), rewriter=rewriter)
    middleware = BPOMiddleware(rewriter)
    # The model is never called: the handler returns the request, so only the middleware is timed.
    chat_model = FakeListChatModel(responses=["unused"])

    def through_middleware(prompt: str) -> Any:
        request = ModelRequest(model=chat_model, messages=[HumanMessage(prompt)])
        return middleware.wrap_model_call(request, lambda r: r)

    cases: dict[str, Callable[[str], Any]] = {
        "direct Rewriter.rewrite": lambda p: rewriter.rewrite(p),
        "langchain BPORewriter.invoke": runnable.invoke,
        "langchain BPOMiddleware.wrap_model_call": through_middleware,
        "llama_index BPOQueryTransform.run": transform.run,
        "dspy BPO.__call__": lambda p: program(question=p),
    }
    for call in cases.values():
        timed(call, 50)  # warm-up
    figures: dict[str, dict[str, float]] = {}
    base = statistics.median(timed(cases["direct Rewriter.rewrite"], args.n))
    for name, call in cases.items():
        samples = timed(call, args.n)
        p50 = statistics.median(samples)
        figures[name] = {
            "p50_ms": round(p50 * 1e3, 4),
            "p95_ms": round(sorted(samples)[int(0.95 * len(samples))] * 1e3, 4),
            "overhead_p50_ms": round((p50 - base) * 1e3, 4),
        }
    print(f"{'integration':<42}{'p50 ms':>10}{'p95 ms':>10}{'overhead p50 ms':>18}")
    for name, row in figures.items():
        print(f"{name:<42}{row['p50_ms']:>10.4f}{row['p95_ms']:>10.4f}{row['overhead_p50_ms']:>18.4f}")
    args.out.write_text(json.dumps({"n": args.n, "model": args.model, "target_overhead_p50_ms": 1.0, "results": figures}, indent=2))
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
