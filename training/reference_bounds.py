"""How far the "closer to the reference than the raw prompt" target can be reached, from an eval's rows.

MiniLM cosine to BPO's reference rewrite already scores the raw prompt high, because most references
are close paraphrases. This prints, on the same pairs: the raw prompt, the model's rewrites, the raw
prompt with generic guidance appended (what a rewriter adds when it knows nothing specific), and an
oracle that takes the better of rewrite and raw prompt for each pair (the ceiling of any guard or
selector that picks between them).

    python training/reference_bounds.py runs/eval-r16/rows_*.jsonl --out training/results/reference_bounds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

GENERIC_GUIDANCE = (
    " Please provide a detailed and helpful response.",
    " Be specific and concise.",
    "\nPlease provide a detailed, well-structured response with specific examples and explanations.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=Path, help="rows_*.jsonl written by `bpo eval`")
    parser.add_argument("--out", type=Path, default=Path("training/results/reference_bounds.json"))
    args = parser.parse_args()

    from bpo_plugins.embeddings import Embedder

    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("reference")]
    prompts, references = [r["prompt"] for r in rows], [r["reference"] for r in rows]
    embedder = Embedder()
    raw = embedder.cosine(prompts, references)
    rewrites = embedder.cosine([r["rewritten"] for r in rows], references)
    figures = {
        "pairs": len(rows),
        "raw_prompt": round(statistics.fmean(raw), 4),
        "rewrites": round(statistics.fmean(rewrites), 4),
        "oracle_best_of_rewrite_and_raw": round(statistics.fmean(max(a, b) for a, b in zip(rewrites, raw)), 4),
        "raw_plus_generic_guidance": {
            text.strip(): round(statistics.fmean(embedder.cosine([p.rstrip() + text for p in prompts], references)), 4)
            for text in GENERIC_GUIDANCE
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
