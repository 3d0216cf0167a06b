"""``bpo proxy`` for fleets, against real processes: ``--workers``, a Redis cache shared by replicas,
OpenTelemetry over OTLP/HTTP, and the Rewriter's own spans.

The optimizer is the scripted OpenAI-compatible process (``script_server``); the upstream for
``/v1/messages`` is the scripted Anthropic process; Redis is a real ``redis-server`` on a free port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import pytest

from bpo_plugins.cache import REDIS_BACKOFF_S
from tests.conftest import CLIServer, Server, start_cli_server
from tests.support.anthropic_server import reply_for
from tests.support.otlp_receiver import read_records
from tests.support.processes import anthropic_upstream, otlp_receiver, redis_server

pytestmark = pytest.mark.slow
HARRY = "Tell me about Harry Potter"
HARRY_REWRITE = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."


@pytest.fixture(scope="module")
def claude_upstream() -> Server:
    yield from anthropic_upstream()


def proxy_args(script_server: Server, upstream: Server, *extra: str) -> list[str]:
    return ["proxy", "--upstream", script_server.base_url, "--anthropic-upstream", upstream.url,
            "--optimizer", "script", "--optimizer-base-url", script_server.base_url, *extra]


def ask(gateway: CLIServer, text: str, **headers: str) -> httpx.Response:
    body = {"model": "claude-test", "max_tokens": 32, "messages": [{"role": "user", "content": text}]}
    return httpx.post(gateway.url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01", **headers}, timeout=30)


def optimizer_calls(script_server: Server, text: str) -> int:
    return sum(text in json.dumps(r["body"]) for r in script_server.received() if r["body"].get("model") == "script")


# --- workers -----------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The worker processes (multiprocessing's spawned children, not its resource tracker) of ``pid``."""
    out = subprocess.run(["ps", "ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]


def test_two_workers_both_serve_metrics_add_up_and_shutdown_drains_streams(script_server, claude_upstream, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    servers = start_cli_server(proxy_args(script_server, claude_upstream, "--workers", "2", "--no-rewrite"), tmp_path / "gw.log",
                               env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    gateway = next(servers)
    try:
        deadline = time.monotonic() + 60
        while len(children(gateway.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = children(gateway.process.pid)
        assert len(workers) == 2
        # New connections each: the kernel hands them to whichever worker accepts first.
        answers = [ask(gateway, f"worker request {i}", connection="close") for i in range(60)]
        assert all(a.status_code == 200 and a.json()["content"][0]["text"] == reply_for(f"worker request {i}")
                   for i, a in enumerate(answers))
        served = {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}
        assert set(workers) <= served  # both workers counted requests: both served
        text = httpx.get(gateway.url + "/metrics", timeout=10).text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith('bpo_gateway_requests_total{endpoint="messages",status="200"}'))
        assert total == 60  # whichever worker answers /metrics, it counts both workers' requests

        # SIGTERM while a stream is in flight: the stream finishes before the workers exit.
        body = {"model": "claude-test", "max_tokens": 32, "messages": [{"role": "user", "content": "drain me"}], "stream": True}
        events: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", gateway.url + "/v1/messages", json=body, headers={"x-test-fault": "trickle=0.05"}, timeout=30) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("event: "))

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.4)
        gateway.process.send_signal(signal.SIGTERM)
        reader.join(30)
        assert events[-1] == "event: message_stop" and events.count("event: content_block_delta") == 25
        assert gateway.process.wait(30) is not None
    finally:
        next(servers, None)


# --- a Redis cache shared by two gateways --------------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Server:
    yield from redis_server(tmp_path)


def test_two_gateways_share_one_redis_cache_and_survive_redis_dying(script_server, claude_upstream, redis, tmp_path):
    first = start_cli_server(proxy_args(script_server, claude_upstream, "--cache-url", redis.url), tmp_path / "gw1.log")
    second = start_cli_server(proxy_args(script_server, claude_upstream, "--cache-url", redis.url), tmp_path / "gw2.log")
    one, two = next(first), next(second)
    try:
        prompt = f"{HARRY} ({time.time_ns()})"  # a prompt no earlier test cached
        a = ask(one, prompt)
        assert (a.status_code, a.headers["x-bpo-cache"]) == (200, "miss")
        b = ask(two, prompt)
        assert (b.status_code, b.headers["x-bpo-cache"]) == (200, "hit")
        assert b.headers["x-bpo-rewrite"] == a.headers["x-bpo-rewrite"]
        assert optimizer_calls(script_server, prompt) == 1  # the second gateway never called the optimizer

        redis.process.send_signal(signal.SIGSTOP)  # Redis hangs: a miss after the 25 ms timeout, never a failure
        try:
            slow = ask(one, f"redis is frozen {time.time_ns()}")
            assert (slow.status_code, slow.headers["x-bpo-cache"]) == (200, "miss")
        finally:
            redis.process.send_signal(signal.SIGCONT)
        assert 'bpo_gateway_cache_errors_total{kind="timeout"}' in httpx.get(one.url + "/metrics").text

        redis.stop()  # Redis dies mid-run: every request still gets its answer, as a cache miss
        time.sleep(REDIS_BACKOFF_S + 0.2)  # past the frozen Redis's backoff, so the next calls try (and fail) again
        for i in range(5):
            for gateway in (one, two):
                response = ask(gateway, f"after redis {i} {time.time_ns()}")
                assert response.status_code == 200 and response.headers["x-bpo-cache"] == "miss"
        metrics = httpx.get(one.url + "/metrics").text
        assert 'bpo_gateway_cache_errors_total{kind="error"}' in metrics
        assert 'bpo_gateway_cache_total{result="hit"}' not in metrics  # the first gateway never hit
        assert redis.url.split("//")[1] not in (tmp_path / "gw1.log").read_text()  # no URL (it may hold a password) in logs
    finally:
        next(first, None)
        next(second, None)


def test_rewriters_on_two_processes_share_the_redis_cache(script_server, redis):
    """The Rewriter's own cache_url: framework users on several machines share one cache."""
    code = (
        "import sys\nfrom bpo_plugins import Rewriter\n"
        "r = Rewriter.from_openai('script', base_url=sys.argv[1], cache_url=sys.argv[2])\n"
        "res = r.rewrite(sys.argv[3])\nprint(res.cached, res.rewritten)\n"
    )
    prompt = f"{HARRY} [{time.time_ns()}]"
    runs = [subprocess.run([sys.executable, "-c", code, script_server.base_url, redis.url, prompt], capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    outputs = [run.stdout.strip() for run in runs]
    assert outputs[0].startswith("False ") and outputs[1].startswith("True "), [r.stderr[-500:] for r in runs]
    assert outputs[0].split(" ", 1)[1] == outputs[1].split(" ", 1)[1]


# --- OpenTelemetry -------------------------------------------------------------------------------------


def spans(records: list[bytes]) -> list:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    found = []
    for raw in records:
        request = ExportTraceServiceRequest()
        request.ParseFromString(raw)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                found += [(resource, span) for span in scope.spans]
    return found


def attributes(span) -> dict:
    return {a.key: next(iter(a.value.ListFields()))[1] if a.value.ListFields() else None for a in span.attributes}


def test_spans_reach_an_otlp_receiver_without_keys_or_prompt_text(script_server, claude_upstream, tmp_path):
    out = tmp_path / "otlp.bin"
    receiver = otlp_receiver(out)
    otlp = next(receiver)
    upstream_key, gateway_key, client_key = "sk-ant-up-SECRET-1111", "gw-SECRET-2222", "sk-ant-client-SECRET-3333"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_SERVICE_NAME": "bpo-test-gateway", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "BPO_UPSTREAM_ANTHROPIC_API_KEY": upstream_key, "BPO_GATEWAY_KEYS": gateway_key}
    servers = start_cli_server(proxy_args(script_server, claude_upstream), tmp_path / "gw.log", env=env)
    gateway = next(servers)
    try:
        c = anthropic.Anthropic(base_url=gateway.url, api_key=client_key, default_headers={"X-BPO-Key": gateway_key}, max_retries=0)
        secret_prompt = f"{HARRY} with the secret word zanzibar-{time.time_ns()}"
        c.messages.create(model="claude-test", max_tokens=32, messages=[{"role": "user", "content": secret_prompt}])
        c.messages.create(model="claude-test", max_tokens=32, messages=[{"role": "user", "content": HARRY}])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len({s.name for _, s in spans(read_records(str(out)))}) < 4:
            time.sleep(0.1)
    finally:
        next(servers, None)  # shutdown flushes what is left
        next(receiver, None)
    records = read_records(str(out))
    found = spans(records)
    names = {span.name for _, span in found}
    assert {"bpo.gateway.request", "bpo.gateway.rewrite", "bpo.gateway.upstream", "bpo.rewrite"} <= names
    service = {a.value.string_value for resource, _ in found for a in resource.resource.attributes if a.key == "service.name"}
    assert service == {"bpo-test-gateway"}
    rewrites = [attributes(s) for _, s in found if s.name == "bpo.gateway.rewrite"]
    assert any(a["bpo.rewrite.outcome"] == "applied" and a["bpo.rewrite.cache"] in ("hit", "miss") for a in rewrites)
    upstream = [attributes(s) for _, s in found if s.name == "bpo.gateway.upstream"]
    assert all(a["http.response.status_code"] == 200 and a["bpo.upstream.ttfb_ms"] > 0 for a in upstream)
    request = {s.parent_span_id for _, s in found if s.name in ("bpo.gateway.rewrite", "bpo.gateway.upstream")}
    assert request <= {s.span_id for _, s in found if s.name == "bpo.gateway.request"}  # children of the request span
    raw = b"".join(records)
    for secret in (upstream_key, gateway_key, client_key, "zanzibar", "Harry Potter", "overview of the Harry"):
        assert secret.encode() not in raw, secret


def test_the_rewriter_records_a_span_per_rewrite_when_a_tracer_provider_is_set(script_server):
    code = (
        "import sys\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "from bpo_plugins import Rewriter\n"
        "r = Rewriter.from_openai('script', base_url=sys.argv[1])\n"
        "r.rewrite('before any provider')\n"
        "exporter = InMemorySpanExporter()\n"
        "provider = TracerProvider(); provider.add_span_processor(SimpleSpanProcessor(exporter)); trace.set_tracer_provider(provider)\n"
        "r.rewrite_batch(['Tell me about Harry Potter', 'What is the capital of France?'])\n"
        "import json\n"
        "print(json.dumps([[s.name, dict(s.attributes), (s.end_time - s.start_time) / 1e6] for s in exporter.get_finished_spans()]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, script_server.base_url], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BPO_OTEL_CAPTURE_PROMPTS": "0"})
    recorded = json.loads(run.stdout.strip().splitlines()[-1])
    assert [name for name, _, _ in recorded] == ["bpo.rewrite", "bpo.rewrite"]  # none before the provider was set
    (_, harry, ms), (_, france, _) = recorded
    assert harry["bpo.rewrite.outcome"] == "applied" and harry["bpo.optimizer.model"] == "script" and ms > 0
    assert france["bpo.rewrite.outcome"] == "fallback" and france["bpo.rewrite.fallback_reason"] == "answered"
    assert "bpo.prompt" not in harry and "Harry" not in run.stdout


def test_without_otel_variables_no_exporter_starts_and_opentelemetry_is_never_imported(claude_upstream):
    code = (
        "import sys, httpx\n"
        "from bpo_plugins.server import serve_in_thread\n"
        "from bpo_plugins.server.config import load_config\n"
        "from bpo_plugins.server.gateway import build_gateway_app\n"
        "from bpo_plugins.server.workers import relay_only\n"
        "config = relay_only(load_config(None, env={}, upstream=sys.argv[1] + '/v1', anthropic_upstream=sys.argv[1]))\n"
        "server, url = serve_in_thread(build_gateway_app(config))\n"
        "r = httpx.post(url + '/messages', json={'model': 'm', 'max_tokens': 8, 'messages': [{'role': 'user', 'content': 'hi'}]})\n"
        "print(r.status_code, sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    run = subprocess.run([sys.executable, "-c", code, claude_upstream.url], capture_output=True, text=True, timeout=120, env=env)
    assert run.stdout.strip() == "200 []", run.stderr[-1000:]


def test_bad_fleet_settings_exit_2_with_one_line(tmp_path):
    (tmp_path / "secret.toml").write_text('upstream_anthropic_api_key = "sk-ant-in-a-file"\n')
    (tmp_path / "both-caches.toml").write_text(f'cache_path = "{tmp_path / "c.sqlite"}"\ncache_url = "redis://127.0.0.1:6379/0"\n')
    for args in (["--cache-url", "http://127.0.0.1:6379"], ["--anthropic-upstream", "api.anthropic.com"], ["--workers", "0"],
                 ["--config", str(tmp_path / "secret.toml")], ["--config", str(tmp_path / "both-caches.toml")]):
        result = subprocess.run([sys.executable, "-m", "bpo_plugins.cli", "proxy", "--upstream", "http://127.0.0.1:9/v1", *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr[-500:])
        assert "sk-ant-in-a-file" not in result.stderr
