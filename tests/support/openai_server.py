"""``bpo serve``'s server, extended for tests, run as its own process on 127.0.0.1.

On top of the product's OpenAI-compatible chat endpoint over a real local model it adds:
- ``GET /v1/received``: every request body, so tests can see what the target LLM was sent;
- ``POST /v1/messages``: Anthropic's Messages API shape, over the same model or script;
- model ``script``: replies from a JSON file ``{"substring": "reply"}``, where a reply
  ``"__sleep__:S:text"`` waits S seconds first and ``"__error__:CODE"`` returns that status.
  It stands in for OpenAI's and Anthropic's own servers, which cannot exist here;
- models named ``*-dspy``: the real model answers the last ``[[ ## field ## ]]`` input of a
  DSPy ChatAdapter prompt, wrapped in DSPy's output format (a 135M model cannot follow it).

    python tests/support/openai_server.py [--model-path DIR] [--script FILE]

It prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import uuid
from typing import Any

from bpo_plugins.decoding import Decoding
from bpo_plugins.serve import ChatHandler, chat_completion, content_text, make_server, request_decoding

DSPY_FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond|\Z)", re.S)


class TestHandler(ChatHandler):
    script: dict[str, str] = {}
    received: list[dict[str, Any]] = []

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/received"):
            self.send_json(200, {"received": self.received})
        else:
            super().do_GET()

    def do_POST(self) -> None:
        body = self.read_json()
        self.received.append({"path": self.path, "body": body})
        model = str(body.get("model", ""))
        messages = [{"role": m["role"], "content": content_text(m["content"])} for m in body.get("messages", [])]
        if body.get("system"):
            messages.insert(0, {"role": "system", "content": content_text(body["system"])})
        n = int(body.get("n") or 1)
        if model.startswith("script"):
            reply = self.scripted(messages[-1]["content"])
            if reply is None:
                return
            texts, completion_tokens = [reply] * n, len(reply.split()) * n
        elif model.endswith("-dspy"):
            fields = DSPY_FIELD.findall(messages[-1]["content"])
            question = fields[-1][1].strip() if fields else messages[-1]["content"]
            decoding = Decoding(max_new_tokens=int(body.get("max_tokens") or 32))
            output = self.backend.chat([{"role": "user", "content": question}], decoding)  # type: ignore[union-attr]
            answer = output.generations[0].texts[0].strip() or "(no answer)"
            texts, completion_tokens = [f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"] * n, int(output.stats["output_tokens"])
        else:
            output = self.backend.chat(messages, request_decoding(body))  # type: ignore[union-attr]
            texts, completion_tokens = output.generations[0].texts, int(output.stats["output_tokens"])
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        if self.path.rstrip("/").endswith("/messages"):
            return self.send_json(200, {
                "id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": texts[0]}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            })
        self.send_json(200, chat_completion(model, texts, prompt_tokens, completion_tokens))

    def scripted(self, last: str) -> str | None:
        reply = next((r for key, r in self.script.items() if key in last), last)
        if reply.startswith("__error__:"):
            self.send_json(int(reply.split(":")[1]), {"error": {"message": "scripted failure", "type": "server_error"}})
            return None
        if reply.startswith("__sleep__:"):
            _, seconds, reply = reply.split(":", 2)
            time.sleep(float(seconds))
        return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path")
    parser.add_argument("--script")
    args = parser.parse_args()
    backend = None
    if args.model_path:
        import torch

        from bpo_plugins.backends.transformers import TransformersBackend

        torch.set_num_threads(1)
        backend = TransformersBackend.load(args.model_path)
    if args.script:
        with open(args.script) as f:
            TestHandler.script = json.load(f)
    server = make_server(backend, handler=TestHandler)  # type: ignore[arg-type]
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
