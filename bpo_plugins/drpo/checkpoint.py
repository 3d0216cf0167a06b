"""A search's state after a level, on disk: its beam of :class:`Node` values, the level records, the
sampling generator and the spend, so a killed run goes on where it stopped."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bpo_plugins.drpo.calls import Usage
from bpo_plugins.drpo.reward import Judgement

__all__ = ["CHECKPOINT_VERSION", "Checkpoint", "LevelRecord", "Node", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_VERSION = 3  # 3: the root carries no reward; a path holds at most depth states


@dataclass
class Node:
    prompt: str
    #: The reward of each level along this node's path (ranking uses their mean). The root's is
    #: not among them: DRPO's beam starts from the root with an empty reward list.
    rewards: list[float]
    #: The prompt of each earlier level of this node's path, oldest first (a carried prompt repeats).
    lineage: list[str]
    query: str
    answer: str
    judgement: Judgement
    carried: bool = False

    @property
    def path_mean(self) -> float:
        """The mean reward along the path; 0.0 for the root (DRPO's root carries no reward)."""
        return sum(self.rewards) / len(self.rewards) if self.rewards else 0.0

    def needs_edit(self, threshold: float) -> bool:
        return not (self.judgement.perfect or self.judgement.reward > threshold)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "judgement": self.judgement.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Node:
        return cls(**{**data, "judgement": Judgement.from_dict(data["judgement"])})


@dataclass
class LevelRecord:
    """One level of the search, as the report shows it."""

    level: int
    query: str
    source: str
    children: int
    #: Beam prompts that needed no edit (each may extend the depth, once per level).
    carried: int
    rewards: list[float]
    best_reward: float
    #: None at level 0: the root has no path reward (its reward is the report's ``root_reward``).
    best_path_mean: float | None
    best_prompt: str
    live_calls: int
    cost_usd: float
    #: Beam prompts that needed an edit but got no usable proposal: they go on unchanged, with no extension.
    unedited: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LevelRecord:
        return cls(**data)


@dataclass
class Checkpoint:
    """The search after a level: everything a killed run needs to go on where it stopped."""

    fingerprint: str
    level: int
    #: Levels added so far because a beam prompt needed no edit (at most ``max_extensions``).
    extensions: int
    depth_limit: int
    beam: list[Node]
    #: The best distinct prompts seen at any level (the final check's candidates).
    best_seen: list[Node]
    #: The sampling salt's generator, as ``random.getstate()``.
    rng: tuple[Any, ...]
    usage: dict[str, Usage]
    skips: dict[str, int]
    history: list[LevelRecord]
    version: int = CHECKPOINT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "fingerprint": self.fingerprint, "level": self.level, "extensions": self.extensions,
            "depth_limit": self.depth_limit, "beam": [n.to_dict() for n in self.beam], "best_seen": [n.to_dict() for n in self.best_seen],
            "rng": _rng_json(self.rng), "usage": {r: asdict(u) for r, u in self.usage.items()}, "skips": dict(self.skips),
            "history": [h.to_dict() for h in self.history],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        return cls(
            fingerprint=data["fingerprint"], level=int(data["level"]), extensions=int(data["extensions"]),
            depth_limit=int(data["depth_limit"]), beam=[Node.from_dict(n) for n in data["beam"]],
            best_seen=[Node.from_dict(n) for n in data["best_seen"]], rng=_rng_state(data["rng"]),
            usage={r: Usage(**u) for r, u in data["usage"].items()}, skips=dict(data["skips"]),
            history=[LevelRecord.from_dict(h) for h in data["history"]], version=int(data["version"]),
        )


def read_checkpoint(path: Path, fingerprint: str) -> Checkpoint | None:
    """The checkpoint in ``out``, or None; a checkpoint of another search or version is an
    :class:`~bpo_plugins.inputs.InputError` (the command line's exit 2) naming the file."""
    from bpo_plugins.inputs import InputError

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not a checkpoint ({exc.msg}): use --fresh to start over", exc.lineno) from None
    version = data.get("version") if isinstance(data, dict) else None
    if version != CHECKPOINT_VERSION:
        raise InputError(path, f"a version-{version} checkpoint; this bpo-plugins reads version {CHECKPOINT_VERSION}: "
                               "use --fresh to start over (the cached calls are reused) or another --out")
    if data.get("fingerprint") != fingerprint:
        raise InputError(path, "belongs to a search with other settings, models or seeds: use another --out, or --fresh to start over")
    try:
        return Checkpoint.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"a malformed checkpoint ({type(exc).__name__}: {exc}): use --fresh to start over") from None


def write_checkpoint(path: Path, state: Checkpoint) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict(), ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)  # a kill mid-write leaves the previous level's checkpoint


def _rng_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state(data: list[Any]) -> tuple[Any, ...]:
    return (data[0], tuple(data[1]), data[2])
