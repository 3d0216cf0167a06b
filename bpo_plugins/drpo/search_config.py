"""The settings of DRPO's system-prompt search (:class:`~bpo_plugins.drpo.search.Search`): beam,
depth, retrieval, the held-out final check, and our switchable guards. The example optimizer and the
CLI read their defaults from here without loading the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from bpo_plugins.drpo.formats import FORMATS, PromptFormat

#: DRPO's root prompt, where the search (and the example optimizer's answers) start.

INITIAL_PROMPT = "You are a helpful assistant."

@dataclass(frozen=True)
class SearchConfig:
    beam_width: int = 2
    num_actions: int = 3
    depth: int = 20
    #: Levels added, at most this many, when a beam prompt needed no edit (DRPO's depth extension).
    max_extensions: int = 10
    #: A prompt whose answer scores above this mean (or all 5s) is carried forward unchanged.
    carry_threshold: float = 4.5
    #: Examples retrieved per query during the search (DRPO: 2; serving uses the artifact's k).
    k: int = 2
    serve_k: int = 3
    #: Seeds kept out of the search to re-score the top candidates and the initial prompt.
    holdout: int = 8
    top_candidates: int = 3
    #: Prompts of a node's path the optimizer sees, the current one included (DRPO: 5).
    lineage: int = 5
    #: Our guard, off by default (DRPO evaluates every proposal): a proposal longer than this many
    #: characters is dropped (counted in ``skips``). None: no limit.
    max_prompt_chars: int | None = None
    format: str = "chat"
    seed: int = 0
    initial_prompt: str = INITIAL_PROMPT
    #: Our guards, each switchable (docs/faithfulness.md). The held-out final check: the winner is
    #: the best of the top candidates and the initial prompt on ``holdout`` unseen seeds (off:
    #: DRPO's best terminal beam, and every seed goes to the search).
    final_check: bool = True
    #: Read JSON in prose, renamed aspects, "4/5" scores, and ask once more (off: DRPO's parser).
    lenient_parsing: bool = True
    #: A refusal of a harmful query that the judge marked down on Compliance is raised to 5.
    refusal_correction: bool = True

    def guards(self) -> dict[str, bool]:
        """Which of our additions were on: the report and the artifact list them."""
        return {"final_check": self.final_check and self.holdout > 0, "lenient_parsing": self.lenient_parsing,
                "refusal_correction": self.refusal_correction, "prompt_length_cap": self.max_prompt_chars is not None}

    def __post_init__(self) -> None:
        for name in ("beam_width", "num_actions", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1 or None, got {self.max_prompt_chars}")
        if self.max_extensions < 0 or self.holdout < 0:
            raise ValueError("max_extensions and holdout must be >= 0")
        if not 0 <= self.k <= 5 or not 0 <= self.serve_k <= 5:
            raise ValueError("k and serve_k must be between 0 and 5")
        if self.format not in FORMATS:
            raise ValueError(f"unknown prompt format {self.format!r}: use {' or '.join(FORMATS)}")

    @property
    def prompt_format(self) -> PromptFormat:
        return FORMATS[self.format]
