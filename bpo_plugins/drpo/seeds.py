"""DRPO's seed queries: its 180 (Alpaca, LIMA, malicious), the order a search takes them in, and a user's file."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["Seed", "drpo_order", "drpo_seeds", "read_seeds"]


@dataclass(frozen=True)
class Seed:
    query: str
    #: alpaca, lima, malicious (DRPO's three files), or the name of a user's file.
    source: str


def drpo_seeds() -> list[Seed]:
    """DRPO's 180 seed queries (Alpaca, LIMA, malicious), one source after another, each in its
    file's order. A search orders them as DRPO does (:func:`drpo_order`)."""
    data = json.loads(resources.files("bpo_plugins.drpo").joinpath("data", "seeds.json").read_text(encoding="utf-8"))
    return [Seed(q, source) for source in ("alpaca", "lima", "malicious") for q in data[source]]


#: The order in which DRPO's ``interleave_data_arrays`` takes chunks from its sources (``run.py``).
_DRPO_SOURCE_ORDER = ("lima", "malicious", "alpaca")


def drpo_order(seeds: Sequence[Seed], seed: int) -> list[Seed]:
    """The seeds in the order DRPO's ``run.py`` gives its search: each source in random order
    (DRPO: ``random.sample``, unseeded; here drawn with ``seed``), interleaved in chunks sized by
    each source's share of ten (for DRPO's 180: LIMA 2, malicious 2, Alpaca 4), then shuffled by
    numpy with seed 42. Which source each level draws from is therefore DRPO's; which of its
    queries is ``seed``'s. Sources other than DRPO's three follow them, in order of appearance."""
    import numpy as np

    groups: dict[str, list[Seed]] = {}
    for s in seeds:
        groups.setdefault(s.source, []).append(s)
    rng = random.Random(seed)
    drawn = {name: rng.sample(group, len(group)) for name, group in groups.items()}  # DRPO: alpaca, lima, malicious
    names = [n for n in _DRPO_SOURCE_ORDER if n in drawn] + [n for n in drawn if n not in _DRPO_SOURCE_ORDER]
    total = len(seeds)
    frac = {n: max(int(10 * (len(drawn[n]) / total)), 1) for n in names}
    ptr = dict.fromkeys(names, 0)
    open_ = dict.fromkeys(names, True)
    order: list[Seed] = []
    while any(open_.values()):  # interleave_data_arrays, for any number of sources
        for n in names:
            if not open_[n]:
                continue
            if (ptr[n] + 1) * frac[n] - 1 < len(drawn[n]):
                order.extend(drawn[n][ptr[n] * frac[n]:(ptr[n] + 1) * frac[n]])
                ptr[n] += 1
            else:
                order.extend(drawn[n][ptr[n] * frac[n]:])
                open_[n] = False
    np.random.RandomState(42).shuffle(order)  # DRPO: np.random.seed(42); np.random.shuffle(examples)
    return order


def read_seeds(path: str | Path) -> list[Seed]:
    """Seed queries from a text file (one per line), or JSON/JSONL rows with a query field."""
    from bpo_plugins.inputs import read_rows

    path = Path(path)
    if path.suffix == ".txt":
        return [Seed(line.strip(), path.stem) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    seeds = []
    for number, row in enumerate(read_rows(path), 1):
        query = next((row[f] for f in ("query", "prompt", "instruction", "question") if isinstance(row.get(f), str)), None)
        if query is None:
            raise ValueError(f"{path}: row {number} has no string 'query' (or prompt, instruction, question) field")
        seeds.append(Seed(query, str(row.get("source", path.stem))))
    return seeds
