"""BPO as LangChain v1 agent middleware: the latest user message is rewritten before each model call.

    python examples/langchain_agent.py ["your request"]
"""

from __future__ import annotations

import sys

from _target import provider, show
from langchain.agents import create_agent
from langchain_chain import target_llm
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.tools import tool

from bpo_plugins.langchain import BPOMiddleware


@tool
def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


class RewriteEvents(BaseCallbackHandler):
    def __init__(self) -> None:
        self.rewrites: list[dict] = []

    def on_custom_event(self, name, data, **kwargs) -> None:
        if name == "bpo_rewrite":
            self.rewrites.append(data)


def main() -> None:
    request = sys.argv[1] if len(sys.argv) > 1 else "Write a short product description for a reusable water bottle"
    # The offline stand-in model has no tool calling; API models get a tool to show the loop.
    tools = [word_count] if provider() != "local" else []
    agent = create_agent(model=target_llm(), tools=tools, system_prompt="You are a concise copywriter.",
                         middleware=[BPOMiddleware()])
    events = RewriteEvents()
    state = agent.invoke({"messages": [{"role": "user", "content": request}]}, config={"callbacks": [events]})
    first = events.rewrites[0]
    show(first["bpo_original"], first["bpo_rewritten"], first["bpo_fallback"], str(state["messages"][-1].content))


if __name__ == "__main__":
    main()
