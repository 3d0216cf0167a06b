"""A self-play run's settings (:class:`SelfplayConfig`), a prompt with its responses (:class:`Item`) and one prompt's selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bpo_plugins.training.data import normalise
from bpo_plugins.training.scores import (
    LIKELIHOOD_TIE_BAND,
)

SHIPPED = "shipped"
#: Nats/token the best version must beat the worst by for a prompt to give a DPO pair: more than the tie band
#: (0.01) by a wide step, so a pair is never two versions the target cannot tell apart. On the shipped
#: adapter's 238 scored BPO prompts, 202 of 210 with two versions clear it.
PAIR_MARGIN = 0.05


@dataclass
class SelfplayConfig:
    out: str = "runs/selfplay"
    bpo: str = "tests/data/bpo/bpo_val.json"
    #: HH-RLHF harmless-base transcripts, opt-in: with a 135M target the likelihood preference kept rewrites
    #: that spell harmful requests out (training/results/selfplay/README.md), so no default.
    hh: str | None = None
    #: Dolly / Self-Instruct sets: reference response preferred, the target's raw answer rejected. They are
    #: eval sets elsewhere (bpo-small's figures); a set named here is no longer held out of training.
    references: list[str] = field(default_factory=list)
    #: Preference files ({prompt, context?, chosen, rejected}, BPO rows or HH transcripts), one pool each: more
    #: prompts with a good and a bad response to judge candidates by (CoachLM's triples from ``bpo data mix``).
    preferences: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=lambda: ["tests/data/bpo/dolly_eval.json", "tests/data/bpo/self_instruct_eval.json",
                                                         "tests/data/bpo/vicuna_eval.jsonl"])
    rounds: int = 2
    prompts: int = 40  # new prompts per round, drawn in turn from each source (cost: training/results/selfplay/README.md)
    num_candidates: int = 8
    margin: float = LIKELIHOOD_TIE_BAND  # nats/token a candidate must beat the raw prompt by to be kept
    heldout_fraction: float = 0.2
    heldout_limit: int | None = None  # score only the first k held-out pairs (tests)
    seed: int = 42
    base_model: str = "smollm2-135m-instruct"
    #: The first round's optimizer: an adapter on base_model ("shipped": the bundled bpo-small's; None: the base).
    start_adapter: str | None = SHIPPED
    #: auto: the bundled models' default runtime (ONNX Runtime GenAI int8), each round's adapter exported
    #: to it; transformers: fp32 torch.
    runtime: str = "auto"
    target: str = "smollm2-135m-instruct"
    target_base_url: str | None = None
    max_new_tokens: int = 128  # per rewrite
    response_tokens: int = 128  # of each response scored by likelihood
    answer_tokens: int = 128  # per target answer (answer margin, Dolly/Self-Instruct rejected answers)
    score_batch: int = 8
    #: Each round's training: "sft" (expert iteration: LoRA SFT from the base on every round's kept versions) or
    #: "dpo" (TRL's DPO on the adapter the round drew from, on this round's best/worst pairs; that adapter, frozen, is
    #: the reference).
    method: str = "sft"
    dpo_beta: float = 0.1
    pair_margin: float = PAIR_MARGIN
    #: TrainConfig fields for each round's SFT (the shipped bpo-small recipe unless told otherwise); DPO reads
    #: batch_size, max_length, lora_r/lora_alpha (a new LoRA) and dpo_learning_rate / dpo_epochs.
    train: dict[str, Any] = field(default_factory=lambda: {"epochs": 4.0, "learning_rate": 5e-4, "batch_size": 8, "max_length": 256,
                                                            "lora_r": 16, "lora_alpha": 32, "keep_as_is_fraction": 0.1})

    @property
    def template(self) -> str:
        """The optimizer's training template: the bundled base's chat template, else what its tokenizer has."""
        return "bpo-chat" if self.base_model == "smollm2-135m-instruct" else "auto"


@dataclass(frozen=True)
class Item:
    """A prompt with a preferred and a rejected response (``rejected`` None: the target's raw answer, made later)."""

    prompt: str
    chosen: str
    rejected: str | None
    context: str | None = None
    source: str = ""
    reference: str | None = None  # BPO's own rewrite, where the source has one

    @property
    def key(self) -> str:
        return normalise(self.prompt + "\x00" + (self.context or ""))


@dataclass
class Selection:
    """One prompt's candidates, their guard verdicts and scores; which version is kept is
    :func:`~bpo_plugins.training.selfplay.selection.selection_fields`, under a margin."""

    raw_score: float
    candidates: list[dict[str, Any]]
