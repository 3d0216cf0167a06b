"""Bounds on the held-out split of ``bpo data selfplay``: what fixed versions of each prompt score on both proxies.

Versions: BPO's reference rewrite; the raw prompt with generic guidance appended (what a rewriter adds when it
knows nothing about the prompt); and the raw prompt with the reference's additions appended (the complement
design's target, ``training/complement.py``). A trained optimizer should beat the generic suffixes on the
likelihood and approach the complement on both proxies.

    python training/heldout_bounds.py --out training/results/v2/heldout-bounds.json [--heldout-limit 30]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bpo_plugins.training.complement import complement
from bpo_plugins.training.data import Pair
from bpo_plugins.training.reference_bounds import GENERIC_GUIDANCE
from bpo_plugins.training.selfplay import Item, SelfplayConfig, fixed_versions, heldout_table


def _with_additions(item: Item) -> str:
    return complement(Pair(item.prompt, item.reference or item.prompt)).optimized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("training/results/v2/heldout-bounds.json"))
    parser.add_argument("--cache", type=Path, default=Path("runs/heldout-bounds"), help="Folder of the score cache (resumes).")
    parser.add_argument("--heldout-limit", type=int, default=None, help="Only the first K held-out pairs.")
    parser.add_argument("--tokens", type=int, default=64, help="Response tokens (likelihood) and answer tokens (answer margin).")
    args = parser.parse_args()

    versions = {"reference": lambda i: i.reference or i.prompt}
    versions |= {f"raw + {text.strip()!r}": (lambda i, t=text: i.prompt.rstrip() + t) for text in GENERIC_GUIDANCE}
    versions["raw + the reference's additions (complement target)"] = _with_additions
    config = SelfplayConfig(out=str(args.cache), heldout_limit=args.heldout_limit, response_tokens=args.tokens, answer_tokens=args.tokens)
    rows = fixed_versions(config, versions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"heldout": rows[0]["n"], "tokens": args.tokens, "versions": rows}, indent=2) + "\n")
    table = "\n".join(heldout_table(rows)) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
