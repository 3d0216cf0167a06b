"""A small OpenAI- and Anthropic-compatible HTTP server for tests, run as its own process.

It serves a real local causal LM (the bundled SmolLM2, or a tiny Llama) on 127.0.0.1, so
code under test talks real HTTP through the real openai / anthropic / litellm clients.
A model named ``*-dspy`` answers the last ``[[ ## field ## ]]`` input of a DSPy ChatAdapter
prompt with the real model and wraps the answer in DSPy's output format, which a 135M model
cannot follow by itself. Models named ``script`` answer from a JSON file instead: ``{"substring": "reply"}``, where a
reply ``"__sleep__:S:text"`` waits S seconds first and ``"__error__:CODE"`` returns that
HTTP status. That stands in for OpenAI's and Anthropic's own servers, which cannot exist here.

    python tests/support/openai_server.py --model-path DIR [--script FILE] [--port 0]

It prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LocalModel:
    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.lock = threading.Lock()
        self.prompts: list[str] = []  # every prompt received, for tests to inspect

    def chat(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float, n: int, stop: list[str]) -> tuple[list[str], int, int]:
        import torch

        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        sample = temperature > 0
        with self.lock, torch.inference_mode():
            out = self.model.generate(
                **batch,
                max_new_tokens=max_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=None,
                top_k=None,
                num_return_sequences=n,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        for s in stop:
            texts = [t.split(s)[0] for t in texts]
        return texts, int(batch["input_ids"].shape[1]), int(new.numel())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


class Handler(BaseHTTPRequestHandler):
    model: LocalModel | None = None
    script: dict[str, str] = {}
    received: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": "local", "object": "model", "owned_by": "tests"}]})
        elif self.path.rstrip("/").endswith("/received"):
            self._send(200, {"received": self.received})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.received.append({"path": self.path, "body": body})
        messages = [{"role": m["role"], "content": _content_text(m["content"])} for m in body.get("messages", [])]
        if body.get("system"):
            system = body["system"] if isinstance(body["system"], str) else _content_text(body["system"])
            messages.insert(0, {"role": "system", "content": system})
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 64)
        stop = body.get("stop") or body.get("stop_sequences") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if str(body.get("model", "")).startswith("script"):
            last = messages[-1]["content"] if messages else ""
            reply = next((r for k, r in self.script.items() if k in last), last)
            if reply.startswith("__error__:"):
                return self._send(int(reply.split(":")[1]), {"error": {"message": "scripted failure", "type": "server_error"}})
            if reply.startswith("__sleep__:"):
                _, seconds, reply = reply.split(":", 2)
                time.sleep(float(seconds))
            texts, prompt_tokens, completion_tokens = [reply] * n, len(last.split()), len(reply.split()) * n
        elif str(body.get("model", "")).endswith("-dspy"):
            assert self.model is not None
            fields = re.findall(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond|\Z)", messages[-1]["content"], re.S)
            question = fields[-1][1].strip() if fields else messages[-1]["content"]
            answers, prompt_tokens, completion_tokens = self.model.chat([{"role": "user", "content": question}], max_tokens, 0.0, 1, [])
            texts = [f"[[ ## answer ## ]]\n{answers[0].strip() or '(no answer)'}\n\n[[ ## completed ## ]]"] * n
        else:
            assert self.model is not None
            temperature = float(body.get("temperature") if body.get("temperature") is not None else 0.0)
            texts, prompt_tokens, completion_tokens = self.model.chat(messages, max_tokens, temperature, n, stop)
        if self.path.rstrip("/").endswith("/messages"):
            return self._send(200, {
                "id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "model": body.get("model"),
                "content": [{"type": "text", "text": texts[0]}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            })
        self._send(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"} for i, t in enumerate(texts)
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path")
    parser.add_argument("--script")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.model_path:
        Handler.model = LocalModel(args.model_path)
    if args.script:
        with open(args.script) as f:
            Handler.script = json.load(f)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
