"""The prompts of each round and the held-out slice every figure is reported on."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from bpo_plugins.inputs import UsageError, read_rows
from bpo_plugins.training.data import Pair, normalise, read_pairs, read_triplets
from bpo_plugins.training.selfplay.config import Item, SelfplayConfig

# --- data -------------------------------------------------------------------------------------


def heldout_split(path: str | Path, fraction: float = 0.2, seed: int = 42) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs) of BPO's pairs: the held-out slice starts with the 10% that
    ``bpo train``'s seed-42 split (the shipped bpo-small) held out, then a seeded draw of the rest."""
    from bpo_plugins.training.sft import _split_pairs

    pairs = read_pairs([path])
    _, shipped_val = _split_pairs(pairs, 0.1, 42)
    held = {normalise(p.prompt) for p in shipped_val}
    rest = [p for p in pairs if normalise(p.prompt) not in held]
    random.Random(seed).shuffle(rest)
    n = max(int(len(pairs) * fraction), len(shipped_val))
    heldout = list(shipped_val) + rest[: n - len(shipped_val)]
    keys = {normalise(p.prompt) for p in heldout}
    return [p for p in pairs if normalise(p.prompt) not in keys], heldout


def _reference_items(path: str | Path) -> list[Item]:
    items = []
    for row in read_rows(path):
        prompt, reference = row.get("instruction") or row.get("prompt"), row.get("response", row.get("output"))
        if isinstance(prompt, str) and isinstance(reference, str) and prompt.strip() and reference.strip():
            items.append(Item(prompt, reference, None, row.get("context") or None, Path(path).name))
    return items


def load_pool(config: SelfplayConfig) -> tuple[list[list[Item]], list[Item], list[Pair]]:
    """(training prompts per source, held-out items, BPO training pairs); no held-out or excluded prompt is in a pool."""
    from bpo_plugins.training.data import eval_prompts

    train_pairs, heldout = heldout_split(config.bpo, config.heldout_fraction, config.seed)
    banned = eval_prompts([e for e in config.exclude if Path(e).name not in {Path(r).name for r in config.references} and Path(e).exists()])
    banned |= {normalise(p.prompt) for p in heldout}
    sources = [[Item(p.prompt, p.good_res, p.bad_res, p.context, "bpo", p.optimized) for p in train_pairs if p.good_res and p.bad_res]]
    if config.hh:
        # Single-turn transcripts only: a later Human turn ("yep", "what about pens?") means nothing
        # without the dialogue before it, and the optimizer rewrites one prompt.
        sources.append([Item(t.prompt, t.chosen, t.rejected, None, "hh-rlhf") for t in read_triplets(config.hh)])
    for path in config.references:
        sources.append(_reference_items(path))
    for path in config.preferences:
        triplets = read_triplets(path)
        if not triplets:
            raise UsageError(f"{path}: no preference rows ({{prompt, chosen, rejected}}, BPO's good_res/bad_res, or HH transcripts)")
        sources.append([Item(t.prompt, t.chosen, t.rejected, t.context, t.source) for t in triplets])
    pools = []
    seen: set[str] = set()  # across sources too: a prompt two sources share is drawn once
    for i, source in enumerate(sources):
        kept = []
        for item in source:
            if normalise(item.prompt) not in banned and item.key not in seen:
                seen.add(item.key)
                kept.append(item)
        random.Random(config.seed + i).shuffle(kept)
        pools.append(kept)
    held = [Item(p.prompt, p.good_res, p.bad_res, p.context, "bpo-heldout", p.optimized) for p in heldout]
    return pools, held[: config.heldout_limit] if config.heldout_limit else held, train_pairs


def round_prompts(pools: Sequence[Sequence[Item]], round_no: int, per_round: int) -> list[Item]:
    """Round ``round_no``'s prompts (1-based): the next ``per_round`` of the sources taken in turn, so
    rounds never share a prompt."""
    order: list[Item] = []
    for i in range(max((len(p) for p in pools), default=0)):
        order.extend(pool[i] for pool in pools if i < len(pool))
    return order[(round_no - 1) * per_round : round_no * per_round]
