"""The OpenAI-compatible server, over real HTTP on 127.0.0.1, driven by the official `openai` client and httpx."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

from gpt_jax import decode, serve
from gpt_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-key"


# tiny_workdir, the model served here, is a session fixture in conftest.py (configs/tiny.py, 20 steps)


class ServerThread:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a thread."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 300
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tiny_workdir):
    loaded = workdir_lib.load(tiny_workdir)
    server = serve.Server(loaded, max_batch=4)
    with ServerThread(serve.create_app(server, api_key=KEY, warmup_prompt_len=32)) as thread:
        thread.model, thread.loaded = server, loaded
        yield thread


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _greedy_text(served, prompt: str, n: int) -> str:
    tok = served.loaded.tokenizer
    ids = decode.generate(served.loaded.model, served.loaded.model_cfg, [tok.encode(prompt)], n,
                          decode.SamplingParams(0.0), eos_id=tok.eos_id)[0].token_ids
    return tok.decode(ids)


def test_openai_client_models_completions_chat_and_streaming(served, client):
    name = served.model.name
    assert [m.id for m in client.models.list().data] == [name]

    done = client.completions.create(model=name, prompt="ROMEO:", max_tokens=20, temperature=0)
    text = done.choices[0].text
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 20 and done.usage.prompt_tokens == 6
    assert text == _greedy_text(served, "ROMEO:", 20)  # the server decodes what the library decodes
    chunks = list(client.completions.create(model=name, prompt="ROMEO:", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"  # (tokens that pile up go out as one chunk)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=15, temperature=0)
    reply = chat.choices[0].message
    assert reply.role == "assistant" and chat.usage.completion_tokens <= 15
    stream = list(client.chat.completions.create(model=name, messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.content
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == chat.choices[0].finish_reason
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stop_n_seed_and_echo(served, client):
    name = served.model.name
    text = client.completions.create(model=name, prompt="KING:", max_tokens=30, temperature=0).choices[0].text
    stop = text[8:10]
    stopped = client.completions.create(model=name, prompt="KING:", max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[:text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=name, prompt="KING:", max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text

    sampled = [client.completions.create(model=name, prompt="KING:", max_tokens=12, n=3, seed=11, temperature=1.0,
                                         top_p=0.9, extra_body={"top_k": 20}) for _ in range(2)]
    texts = [[c.text for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # seeded: repeatable; each choice its own stream
    assert [c.index for c in sampled[0].choices] == [0, 1, 2]

    echoed = client.completions.create(model=name, prompt="KING:", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "KING:" + text[:5]
    batch = client.completions.create(model=name, prompt=["KING:", "ROMEO:"], max_tokens=5, temperature=0)
    assert batch.choices[0].text == text[:5] and len(batch.choices) == 2


def _model_logprobs(served, ids: list[int]) -> np.ndarray:
    """log-softmax of the tiny model's logits over `ids` in one forward pass, no cache: [len(ids), vocab]."""
    logits = served.loaded.model(jnp.asarray([ids]))[0][0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def test_logprobs_and_echo_in_openai_legacy_shape(served, client):
    """`logprobs` + `echo` on /v1/completions (what lm-evaluation-harness sends), streamed and not, and chat's
    `logprobs` + `top_logprobs`: log-probabilities of the model's own forward pass, the first prompt token null,
    offsets into the text, a greedy token's value the best of its alternatives exactly."""
    name, tok = served.model.name, served.loaded.tokenizer
    # the prompt alone, scored (max_tokens 0): one entry per character of the char-level model
    scored = client.completions.create(model=name, prompt="ROMEO:", max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert choice.text == "ROMEO:" and scored.usage.completion_tokens == 0
    assert lp.tokens == list("ROMEO:") and lp.text_offset == list(range(6))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = tok.encode("ROMEO:")
    reference = _model_logprobs(served, ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], [reference[j, ids[j + 1]] for j in range(5)], atol=1e-5)
    for j, top in enumerate(lp.top_logprobs[1:]):
        best = np.argsort(-reference[j])[:2]
        assert set(top) == {tok.decode([int(t)]) for t in best} | {lp.tokens[j + 1]}
        np.testing.assert_allclose(max(top.values()), reference[j].max(), atol=1e-5)

    # lm-evaluation-harness' local-completions payload: token-id prompts, one greedy token after each
    prompts = [tok.encode("KING:"), tok.encode("First Citizen:")]
    body = {"model": name, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    with httpx.Client(base_url=served.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        out = http.post("/v1/completions", json=body).json()
        assert [c["index"] for c in out["choices"]] == [0, 1]
        for prompt, c in zip(prompts, out["choices"], strict=True):
            lp = c["logprobs"]
            assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"]) == len(prompt) + 1
            generated = tok.encode(c["text"][len(tok.decode(prompt)):])
            reference = _model_logprobs(served, prompt + generated)
            expected = [reference[j, t] for j, t in enumerate((prompt + generated)[1:])]
            np.testing.assert_allclose(lp["token_logprobs"][1:], expected, atol=1e-5)
            assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy: exactly the best
            assert c["text"].startswith(tok.decode(prompt)) and lp["text_offset"][-1] == len(tok.decode(prompt))

        # generated tokens, streamed or not: the same logprobs
        body = {"model": name, "prompt": "KING:", "max_tokens": 8, "temperature": 0, "logprobs": 3, "echo": True}
        whole = http.post("/v1/completions", json=body).json()["choices"][0]
        lines = http.post("/v1/completions", json={**body, "stream": True}).text.splitlines()
        chunks = [json.loads(x[6:])["choices"][0] for x in lines if x.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    streamed = {key: [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] for key in whole["logprobs"]}
    assert streamed == whole["logprobs"] and len(whole["logprobs"]["tokens"]) == 5 + 8
    assert whole["logprobs"]["tokens"][5:] == [tok.decode([t]) for t in tok.encode(whole["text"][5:])]
    assert all(len(top) <= 4 for top in whole["logprobs"]["top_logprobs"][1:])

    messages = [{"role": "user", "content": "Who are you?"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy
    stream = list(client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    assert [c.token for s in stream if s.choices and s.choices[0].logprobs
            for c in s.choices[0].logprobs.content] == [c.token for c in content]


def test_invalid_requests_get_openai_style_4xx(served, client):
    name = served.model.name
    auth = {"Authorization": f"Bearer {KEY}"}
    long_prompt = "a" * 100  # the context holds 64 characters
    cases = [
        ("POST", "/v1/completions", b'{"model": "x", "prompt": ', auth, 400),  # malformed JSON
        ("POST", "/v1/completions", {"model": name}, auth, 400),  # no prompt
        ("POST", "/v1/chat/completions", {"model": name}, auth, 400),  # no messages
        ("POST", "/v1/completions", {"prompt": "hi"}, auth, 400),  # no model
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 10**9}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 0}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "temperature": -0.5}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "top_p": 1.5}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "n": 0}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": [10**6]}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "logprobs": 6}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 0, "logprobs": 1}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": long_prompt, "max_tokens": 0, "echo": True}, auth, 400),
        ("POST", "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}],
                                          "top_logprobs": 2}, auth, 400),
        ("POST", "/v1/completions", {"model": name, "prompt": long_prompt}, auth, 400),
        ("POST", "/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": long_prompt}]},
         auth, 400),
        ("POST", "/v1/chat/completions", {"model": name, "messages": [{"role": "robot", "content": "hi"}]}, auth,
         400),
        ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, auth, 404),
        ("POST", "/v1/completions", {"model": name, "prompt": "x" * (2 << 20)}, auth, 413),
        ("GET", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401),
        ("GET", "/v1/models", None, {}, 401),
        ("GET", "/v1/nowhere", None, auth, 404),
        ("GET", "/v1/completions", None, auth, 405),
    ]
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for method, path, body, headers, status in cases:
            content = body if isinstance(body, bytes) else (None if body is None else json.dumps(body))
            r = http.request(method, path, content=content, headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == status, (path, body if not isinstance(body, dict) else list(body), r.text)
            error = r.json()["error"]
            assert error["message"] and isinstance(error["type"], str) and {"param", "code"} <= error.keys()
        assert http.get("/health").json()["status"] == "ok"  # no key needed
    max_tokens_error = json.loads(json.dumps(cases[4][2]))
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(**max_tokens_error)
    wrong_key = openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_chat_template_or_fallback_and_template_errors_are_400(served):
    """A chat prompt is the tokenizer's Jinja chat template when it has one, else `role: content` lines and
    `assistant:` with `\\nuser:` as a stop; a template that fails on the messages is a 400 naming it."""
    tok = served.model.tokenizer  # the tiny model's character tokenizer: no template, no BOS
    messages = [{"role": "user", "content": "hi"}]
    assert serve.render_chat(tok, messages) == ("user: hi\nassistant:", ("\nuser:",))
    body = {"model": served.model.name, "messages": messages, "max_tokens": 2}
    try:
        tok.chat_template = "{{ bos_token }}{% for m in messages %}\n{{ m.role }}: {{ m.content }}\n  {% endfor %}"
        assert serve.render_chat(tok, messages) == ("user: hi\n", ())  # blocks trimmed, as transformers does
        with httpx.Client(base_url=served.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            for template, message in (("{{ raise_exception('no users here') }}", "chat template: no users here"),
                                      ("{% for %}", "chat template: ")):
                tok.chat_template = template
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text
    finally:
        del tok.chat_template


def test_concurrent_clients_share_decode_steps(served, client):
    name = served.model.name
    prompts = [f"{w}:" for w in ("ROMEO", "KING", "JULIET", "LEAR", "FIRST", "SECOND", "NURSE", "HAMLET")] * 2
    alone = {p: client.completions.create(model=name, prompt=p, max_tokens=16, temperature=0).choices[0].text
             for p in prompts}
    steps_before = served.model.engine.steps
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: client.completions.create(
            model=name, prompt=p, max_tokens=16, temperature=0).choices[0].text, prompts))
    assert together == [alone[p] for p in prompts]  # batching changes nothing in the tokens
    assert served.model.engine.steps - steps_before < len(prompts) * 16 / 2  # rows shared steps


def test_load_32_clients_4_requests_each(served):
    name = served.model.name

    def client_run(i):
        errors = 0
        with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            for j in range(4):
                stream = (i + j) % 2 == 0
                r = http.post("/v1/completions", json={"model": name, "prompt": "A", "max_tokens": 8, "seed": i,
                                                       "stream": stream})
                ok = r.status_code == 200 and (r.text.rstrip().endswith("data: [DONE]") if stream
                                               else r.json()["choices"][0]["finish_reason"] == "length")
                errors += not ok
        return errors

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert sum(pool.map(client_run, range(32))) == 0


def test_client_disconnect_frees_the_row(served):
    name = served.model.name
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"model": name, "prompt": "A", "max_tokens": 60,
                                                          "stream": True}) as r:
            next(r.iter_lines())
        deadline = time.time() + 20
        while served.model.engine.load() != (0, 0):
            assert time.time() < deadline, "the abandoned request kept decoding"
            time.sleep(0.05)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(served):
    """Property-based requests generated from the server's OpenAPI schema: no 5xx, responses conform to the
    schema, and schema-violating requests are refused."""
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(exe):
        pytest.skip("schemathesis is not installed")
    # every check but positive_data_acceptance: schema-valid text can still be refused with a 400 (characters the
    # character-level vocabulary lacks, an empty prompt with no BOS/EOS token, a prompt longer than the context)
    result = subprocess.run(
        [exe, "run", served.url + "/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--max-examples", "25", "--workers", "1", "--header", f"Authorization: Bearer {KEY}",
         "--request-timeout", "60", "--max-time", "20"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.slow
def test_serve_mode_shuts_down_gracefully(tiny_workdir):
    """`--mode=serve` binds 127.0.0.1, logs its start (loading, compiling) and access lines, and on SIGTERM lets a
    stream in flight finish."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gpt_jax.main", "--mode=serve", f"--workdir={tiny_workdir}",
                             f"--port={port}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        lines = []
        # 16 choices × 60 tokens on 8 cache rows: two waves of decoding, so SIGTERM lands mid-stream
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": name, "prompt": "A", "max_tokens": 60, "n": 16, "stream": True}) as r:
            for line in r.iter_lines():
                if line and not lines:
                    proc.send_signal(signal.SIGTERM)
                lines.append(line)
        finished = [json.loads(x[6:])["choices"] for x in lines if x.startswith("data: {")]
        assert sum(c["finish_reason"] == "length" for cs in finished for c in cs) == 16  # every choice completed
        assert [x for x in lines if x][-1] == "data: [DONE]"
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
        stderr = proc.stderr.read()
        assert '"POST /v1/completions" 200' in stderr and "127.0.0.1" in stderr
        start = [line.split(": ", 1)[1] for line in stderr.splitlines() if "gpt_jax.serve:" in line][:4]
        assert re.fullmatch(r"loading .+\|loaded in [\d.]+ s\|compiling the prefill and decode steps for prompts "
                            r"of up to 64 tokens\|compiled in [\d.]+ s", "|".join(start)), start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
