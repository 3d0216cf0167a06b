"""A search's cost plan: upper bounds on calls, tokens and dollars per role, before any call (what
``bpo drpo search --dry-run`` prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bpo_plugins.drpo.calls import Price

if TYPE_CHECKING:
    from bpo_plugins.drpo.search import Search

__all__ = ["cost_plan"]


def cost_plan(search: Search) -> dict[str, dict[str, float]]:
    """Upper bounds on calls and tokens per role, before any call: what ``--dry-run`` prints."""
    c, fmt = search.config, search.config.prompt_format
    levels = min(c.depth + c.max_extensions - 1, len(search.queries) - 1)  # levels after the root
    candidates = c.top_candidates + 1
    evaluations = 1 + levels * c.beam_width * c.num_actions + candidates * len(search.holdout)
    queries = [s.query for s in [*search.queries, *search.holdout]]
    new_queries = sum(q not in search.session.known_aspects for q in queries)
    mean_query = sum(map(len, queries)) / max(len(queries), 1)
    mean_example = sum(len(e.query) + len(e.answer) for e in search.examples) / max(len(search.examples), 1)
    prompt_chars = min(c.max_prompt_chars or 2500, 2500)  # DRPO's published prompts run 1,500-2,500 characters
    answer = search.roles["base"].decoding.max_new_tokens
    chars = {
        "base": prompt_chars + c.k * mean_example + mean_query + len(fmt.system) + len(fmt.user),
        "metrics": 2200 + mean_query, "judge": 2100 + mean_query + 4 * answer,
        "optimizer": 2200 + (c.lineage + 1) * prompt_chars + mean_query + 4 * answer + 600,
    }
    calls = {"base": evaluations, "judge": evaluations, "metrics": new_queries, "optimizer": levels * c.beam_width}
    plan = {}
    for role_name, role in search.roles.items():
        n = calls[role_name]
        out_tokens = n * role.decoding.max_new_tokens * (c.num_actions if role_name == "optimizer" else 1)
        in_tokens = int(n * chars[role_name] / 4)
        cost = (in_tokens * role.price.input + out_tokens * role.price.output) / 1e6
        plan[role_name] = {"model": role.model, "calls": n, "input_tokens": in_tokens, "output_tokens": out_tokens,
                           "cost_usd": round(cost, 4), "priced": role.price != Price()}
    return plan
