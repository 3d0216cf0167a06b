"""BPO inside a LangChain chain: prompt | BPORewriter() | llm | parser.

    python examples/langchain_chain.py ["your question"]
"""

from __future__ import annotations

import sys

from _target import local_base_url, provider, show
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tracers.base import BaseTracer

from bpo_plugins.langchain import BPORewriter


def target_llm():
    if provider() == "openai":
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="gpt-4o-mini")
    if provider() == "anthropic":
        from langchain_anthropic import ChatAnthropic  # pip install langchain-anthropic

        return ChatAnthropic(model="claude-haiku-4-5")
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="local", base_url=local_base_url(), api_key="local", max_tokens=64, temperature=0)


class RewriteLog(BaseTracer):
    """Collects BPORewriter's run metadata: original, rewrite, fallback reason."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata: dict = {}

    def _persist_run(self, run) -> None:
        pass

    def _end_trace(self, run) -> None:
        super()._end_trace(run)
        if "bpo_original" in run.metadata:
            self.metadata = run.metadata


def main() -> None:
    question = sys.argv[1] if len(sys.argv) > 1 else "Tell me about Harry Potter"
    prompt = ChatPromptTemplate.from_messages([("system", "You are a helpful assistant."), ("human", "{question}")])
    chain = prompt | BPORewriter() | target_llm() | StrOutputParser()
    log = RewriteLog()
    answer = chain.invoke({"question": question}, config={"callbacks": [log]})
    show(log.metadata["bpo_original"], log.metadata["bpo_rewritten"], log.metadata["bpo_fallback"], answer)


if __name__ == "__main__":
    main()
