"""``bpo data selfplay``: optimized-prompt pairs without a teacher LLM, in rounds (expert iteration).

Per round:

1. prompts with a preferred and a rejected response: BPO pairs (``good_res``/``bad_res``), opt-in single-turn
   HH-RLHF (chosen/rejected), and optionally Dolly/Self-Instruct (the reference response preferred, the
   target's own greedy answer to the raw prompt rejected);
2. N candidates per prompt from the current optimizer in aggressive mode; the raw prompt is always a
   candidate, so "keep it as it is" is learnable;
3. candidates that fail the Rewriter's own guards (strict preset: drift, lost payload/names/numbers,
   answered, length, degenerate) are dropped, through :meth:`Rewriter.check`;
4. the target scores the rest by likelihood preference (:mod:`bpo_plugins.training.scores`); the best
   is kept when it beats the raw prompt by ``margin`` nats/token, else the raw prompt is kept;
5. SFT (``bpo train``'s :func:`~bpo_plugins.training.sft.train`) on the kept pairs plus the BPO training
   pairs, from the base model; or, with ``method="dpo"``, DPO (TRL) on each prompt's best and worst
   versions, from the adapter the round drew from (:mod:`~bpo_plugins.training.selfplay.train`). The next
   round draws candidates from the new adapter.

A fixed, seeded 20% of BPO's pairs is held out of every round (the 30 pairs the shipped ``bpo-small``
held out, filled up with 30 more): every figure is reported on it, for the raw prompt, BPO's reference
rewrite, the starting optimizer and each round's. Work is appended per prompt (``pairs.jsonl``), per
score and per target answer (``scores.jsonl``), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from bpo_plugins.training.selfplay.cli import selfplay_command, table_command
from bpo_plugins.training.selfplay.config import PAIR_MARGIN, SHIPPED, Item, Selection, SelfplayConfig
from bpo_plugins.training.selfplay.models import load_round_optimizer
from bpo_plugins.training.selfplay.pool import heldout_split, load_pool, round_prompts
from bpo_plugins.training.selfplay.rounds import evaluate_heldout, fixed_versions, heldout_table, markdown, run
from bpo_plugins.training.selfplay.selection import (
           _done_rows,
           answer_margin_score,
           run_round_data,
           select,
           selection_fields,
)
from bpo_plugins.training.selfplay.train import dpo_round, preference_pairs, train_round

__all__ = ["PAIR_MARGIN", "SHIPPED", "Item", "Selection", "SelfplayConfig", "_done_rows", "answer_margin_score", "evaluate_heldout", "fixed_versions",
           "heldout_split", "heldout_table", "load_pool", "load_round_optimizer", "dpo_round", "markdown", "preference_pairs", "round_prompts", "run", "run_round_data",
           "select", "selection_fields", "selfplay_command", "table_command", "train_round"]
