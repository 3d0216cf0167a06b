"""DRPO presets, retrieval, the JSON artifact, and the gateway applying an alignment per model."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from bpo_plugins.drpo import (
    PRESETS,
    RAW_FORMAT,
    Alignment,
    Example,
    icl_examples,
    load_alignment,
    load_preset,
    metrics_cache,
)
from tests.conftest import Server, start_cli_server

TORTURE = "What is the best way to torture a friend who stole my money?"


def test_presets_and_published_data_load_with_no_call():
    assert len(icl_examples()) == 16 and len(metrics_cache()) == 55
    for name in PRESETS:
        aligned = load_preset(name)
        assert len(aligned.system_prompt) > 1500 and aligned.provenance["source"].startswith("github.com/Singla17")
    example = dict((e.query, e.answer) for e in icl_examples())[TORTURE]
    assert not example.startswith("<START>") and "<END>" not in example  # markers are the format's job
    with pytest.raises(ValueError, match="unknown DRPO preset"):
        load_preset("gpt-5")


@pytest.mark.slow  # loads MiniLM
def test_retrieval_picks_the_nearest_examples():
    aligned = load_preset("llama3-8b-instruct")
    assert aligned.retrieve(TORTURE, 1)[0].query == TORTURE
    # A paraphrase with no word in common but the intent still finds the revenge example first.
    assert aligned.retrieve("How can I make my buddy suffer for taking my cash?", 1)[0].query == TORTURE
    assert len(aligned.retrieve("Write a poem about the sea", 5)) == 5


@pytest.mark.slow  # loads MiniLM
def test_apply_lays_out_drpo_inference_format():
    aligned = load_preset("mistral-7b-instruct")
    messages = aligned.apply([{"role": "system", "content": "Answer in French."}, {"role": "assistant", "content": "Bonjour"},
                              {"role": "user", "content": TORTURE}])
    system = messages[0]["content"]
    assert system.startswith(aligned.system_prompt) and system.count("\n\n#Query:\n") == 3 and system.endswith("Answer in French.")
    assert system.count("<START>\n") == 3 and system.count("\n<END>") == 3
    assert messages[1] == {"role": "assistant", "content": "Bonjour"}
    assert messages[2]["content"] == f"# Query:\n{TORTURE}\n\n# Answer:\n<START>"
    body = aligned.apply_to_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "###"})
    assert body["stop"] == ["<END>", "<END", "<|eot_id|>", "###"] and body["messages"][0]["role"] == "system"
    assert aligned.answer("<START>\nBread needs flour.\n<END> trailing") == "Bread needs flour."


def test_raw_format_and_custom_embedder():
    class Letters:  # any object with encode() and a name: here, letter counts
        name = "letter-counts"

        def encode(self, texts):
            rows = np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts], dtype=float) + 1e-9
            return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    bank = (Example("aaaa aaaa", "A."), Example("zzzz zzzz", "Z."))
    aligned = Alignment("Be kind.", bank, k=1, format=RAW_FORMAT).use_embedder(Letters())
    assert aligned.embedder == "letter-counts" and aligned.retrieve("zz top")[0].answer == "Z."
    # DRPO's world_model.py: "# instructions", the prompt, "# Query:" + the examples joined by "\n\n#Query:\n", a blank line, the turn.
    assert aligned.render("zz top") == "# instructions\n\nBe kind.\n\n# Query:\nzzzz zzzz\n\n#Answer:\n<START>\nZ.\n<END>\n\n# Query:\nzz top\n\n# Answer:\n<START>"
    two = Alignment("Be kind.", bank, k=2, format=RAW_FORMAT).use_embedder(Letters())
    assert two.render("zz top") == ("# instructions\n\nBe kind.\n\n# Query:\nzzzz zzzz\n\n#Answer:\n<START>\nZ.\n<END>\n\n#Query:\n"
                                    "aaaa aaaa\n\n#Answer:\n<START>\nA.\n<END>\n\n# Query:\nzz top\n\n# Answer:\n<START>")


@pytest.mark.slow  # loads MiniLM
def test_artifact_round_trips_as_json(tmp_path):
    aligned = load_preset("gpt-3.5-turbo", k=2)
    path = aligned.save(tmp_path / "aligned.json")
    data = json.loads(path.read_text())
    assert data["retrieval"] == {"embedder": "all-MiniLM-L6-v2", "k": 2} and data["format"]["stop"][0] == "<END>"
    assert data["provenance"]["package_version"] and data["provenance"]["preset"] == "gpt-3.5-turbo"
    loaded = load_alignment(path)
    assert (loaded.system_prompt, loaded.examples, loaded.k, loaded.format) == (aligned.system_prompt, aligned.examples, 2, aligned.format)
    assert loaded.apply([{"role": "user", "content": TORTURE}]) == aligned.apply([{"role": "user", "content": TORTURE}])
    for bad in ("not json", json.dumps([1]), json.dumps({"bpo_plugins_artifact": "other"}),
                json.dumps({**data, "version": 99}), json.dumps({**data, "retrieval": {}})):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError):
            Alignment.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no DRPO preset or artifact"):
        load_alignment(tmp_path / "missing.json")


@pytest.mark.slow
def test_gateway_applies_a_drpo_preset_per_model_after_the_bpo_rewrite(script_server: Server, tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[default]\nrewrite = false\n[models."echo-drpo*"]\nrewrite = true\ndrpo = "llama3-8b-instruct"\n')
    args = ["proxy", "--upstream", script_server.base_url, "--optimizer", "script", "--optimizer-base-url", script_server.base_url,
            "--config", str(config)]
    for gateway in start_cli_server(args, tmp_path / "gateway.log"):
        body = {"model": "echo-drpo", "messages": [{"role": "user", "content": "Tell me about Harry Potter"}]}
        response = httpx.post(gateway.base_url + "/chat/completions", json=body, timeout=30)
        assert response.status_code == 200 and response.headers["x-bpo-rewrite"] == "applied"
        sent = [r for r in script_server.received() if r["path"].endswith("/chat/completions")][-1]["body"]
        preset = load_preset("llama3-8b-instruct")
        assert sent["messages"][0]["role"] == "system" and sent["messages"][0]["content"].startswith(preset.system_prompt)
        rewritten = "Provide an overview of the Harry Potter book series, covering its plot, main characters and themes."
        assert sent["messages"][-1]["content"] == f"# Query:\n{rewritten}\n\n# Answer:\n<START>"  # BPO first, then DRPO
        assert "<END>" in sent["stop"]
        httpx.post(gateway.base_url + "/chat/completions", json={**body, "model": "echo"}, timeout=30)
        plain = [r for r in script_server.received() if r["path"].endswith("/chat/completions")][-1]["body"]
        assert plain["messages"] == body["messages"] and "stop" not in plain  # other models untouched
