"""`cortex-edge serve` on loopback, driven by the official openai client: plain and streamed completions,
a conversation's memory across requests and a restart, a disconnect mid-stream (nothing committed), eight
concurrent clients (no turn lost or mixed), every bad-request class, the API key, a full queue."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cortex_edge import contract
from tests.test_cli import cli, one_line_error

pytestmark = pytest.mark.skipif(importlib.util.find_spec("starlette") is None, reason="needs the serve extra")
needs_openai = pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="needs openai (dev extra)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, bundle, home: Path, *extra):
        self.port, self.home = _port(), home
        self.proc = subprocess.Popen([sys.executable, "-m", "cortex_edge", "serve", str(bundle), "--port",
                                      str(self.port), "--threads", "1", *map(str, extra)],
                                     env={**os.environ, "CORTEX_EDGE_HOME": str(home)},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.proc.poll() is not None:
                    raise AssertionError(self.proc.stderr.read()) from None
                time.sleep(0.2)
        raise AssertionError("server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key="none"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def post(self, body, headers=None) -> tuple:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=data, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                if r.headers.get("content-type", "").startswith("text/event-stream"):
                    events = [x[6:] for x in r.read().decode().splitlines() if x.startswith("data: ")]
                    assert events[-1] == "[DONE]" or "error" in json.loads(events[-1]), events[-3:]
                    return r.status, {"choices": "streamed", "events": events}, r.headers
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers

    def idle(self) -> None:
        for _ in range(600):
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                if json.loads(r.read())["queued"] == 0:
                    time.sleep(0.3)
                    return
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def bundle(request):
    return request.getfixturevalue("runtime_bundle")


@pytest.fixture(scope="module")
def endless(bundle, tmp_path_factory):
    """The tiny bundle with no stop tokens: answers run to max_tokens (for disconnects and a full queue)."""
    from cortex_edge.runtime.bundle import fingerprint

    d = tmp_path_factory.mktemp("endless") / "b"
    shutil.copytree(bundle, d)
    man = json.loads((d / contract.MANIFEST).read_text())
    man["tokenizer"]["stop_ids"] = []
    man["fingerprint"] = fingerprint(man["files"], man["model"]["config"], man["weights"], man["state"],
                                     man["tokenizer"])
    (d / contract.MANIFEST).write_text(json.dumps(man))
    return d


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    s = Served(bundle, tmp_path_factory.mktemp("home"))
    yield s
    s.stop()


def _session(home: Path, name: str, bundle):
    from cortex_edge.runtime import session as sess
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    st_, extra, _ = sess.load(home / "sessions" / f"{name}{contract.SESSION_SUFFIX}", Engine(load_bundle(bundle)))
    return st_.n, extra["turns"]


@pytest.mark.aarch64
def test_health_models_and_one_answer(server):
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as r:
        ids = [m["id"] for m in json.loads(r.read())["data"]]
    assert "default" in ids and len(ids) == 2
    code, body, _ = server.post({"model": "default", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 4, "temperature": 0})
    assert code == 200, body
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and 1 <= u["completion_tokens"] <= 4 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


@needs_openai
def test_plain_and_streamed_completions_agree(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Tell me a story."}]
    plain = c.chat.completions.create(model="default", messages=msgs, max_tokens=12, temperature=0)
    text = plain.choices[0].message.content
    chunks = list(c.chat.completions.create(model=plain.model, messages=msgs, max_tokens=12, temperature=0,
                                            stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    seeded = [c.chat.completions.create(model="default", messages=msgs, max_tokens=8, temperature=1.0, seed=7)
              .choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]  # seed honoured


@needs_openai
def test_a_conversation_remembers_across_requests_and_a_restart(bundle, tmp_path):
    home = tmp_path / "home"
    s = Served(bundle, home)
    try:
        c = s.client()
        history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My cat is Pixel."}]
        r1 = c.chat.completions.create(model="default", messages=history, max_tokens=4, temperature=0, user="conv1")
        n1, t1 = _session(home, "conv1", bundle)
        assert t1 == 1 and n1 >= r1.usage.prompt_tokens + r1.usage.completion_tokens
        history += [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "What is my cat called?"}]
        r2 = c.chat.completions.create(model="default", messages=history, max_tokens=4, temperature=0,
                                       extra_headers={"X-Session-Id": "conv1"})
        stateless = c.chat.completions.create(model="default", messages=history, max_tokens=4, temperature=0)
        assert r2.usage.prompt_tokens < stateless.usage.prompt_tokens  # only the new message was fed
        n2, t2 = _session(home, "conv1", bundle)
        assert t2 == 2 and n2 > n1
    finally:
        s.stop()
    s = Served(bundle, home)  # a restart: the conversation is still there
    try:
        s.client().chat.completions.create(model="default", messages=[{"role": "user", "content": "And now?"}],
                                           max_tokens=4, user="conv1")
        n3, t3 = _session(home, "conv1", bundle)
        assert t3 == 3 and n3 > n2
    finally:
        s.stop()
    assert not (home / "sessions" / "None.cxs").exists()  # stateless requests saved nothing


def test_a_disconnect_mid_stream_commits_nothing(endless, tmp_path):
    import http.client

    home = tmp_path / "home"
    s = Served(endless, home)
    try:
        code, _, _ = s.post({"model": "default", "messages": [{"role": "user", "content": "one"}], "max_tokens": 3,
                             "user": "d"})
        assert code == 200
        before = (home / "sessions" / "d.cxs").read_bytes()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "default", "messages": [{"role": "user", "content": "two"}], "max_tokens": 4000,
             "stream": True, "user": "d"}), {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read(5) == b"data:"  # the answer has started
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        s.idle()
        assert (home / "sessions" / "d.cxs").read_bytes() == before  # the turn was not committed
        code, _, _ = s.post({"model": "default", "messages": [{"role": "user", "content": "three"}],
                             "max_tokens": 3, "user": "d"})
        assert code == 200 and _session(home, "d", endless)[1] == 2
    finally:
        s.stop()


@needs_openai
def test_eight_concurrent_clients_lose_and_mix_nothing(server, bundle):
    errors, results = [], {}

    def client(i):
        try:
            r = server.client().chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=6,
                user=f"many{i % 4}")
            results[i] = r
        except Exception as e:  # noqa: BLE001 (collected, asserted below)
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 8
    for k in range(4):  # two requests per conversation: both turns kept, in that conversation only
        assert _session(server.home, f"many{k}", bundle)[1] == 2


def test_every_bad_request_is_a_json_error(server):
    ok = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (b"{not json", 400, None),
        ({**ok, "model": "gpt-9"}, 404, "model"),
        ({"model": "default"}, 400, "messages"),
        ({**ok, "messages": []}, 400, "messages"),
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ({**ok, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, "messages"),
        ({**ok, "temperature": 5}, 400, "temperature"),
        ({**ok, "top_p": float("nan")}, 400, None),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": "many"}, 400, "max_tokens"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**ok, "seed": -1}, 400, "seed"),
        ({**ok, "n": 3}, 400, "n"),
        ({**ok, "user": "../../etc/passwd"}, 400, "user"),
        ({**ok, "stream": "yes"}, 400, "stream"),
        ({**ok, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}, 413, None),
        ({**ok, "messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
        ([1, 2], 400, None),
    ]
    for body, status, param in cases:
        if isinstance(body, dict) and isinstance(body.get("top_p"), float):
            body = json.dumps(body).replace("NaN", "NaN").encode()
        code, err, _ = server.post(body)
        assert code == status, (body if len(str(body)) < 200 else "big", code, err)
        assert set(err["error"]) >= {"message", "type", "param", "code"}
        if param:
            assert err["error"]["param"] == param, err
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as r:
        assert r.status == 200  # and the server is still there


@needs_openai
def test_the_api_key(bundle, tmp_path):
    import openai

    s = Served(bundle, tmp_path, "--api-key", "correct horse battery")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}])
        code, _, _ = s.post({"model": "default", "messages": [{"role": "user", "content": "x"}]})
        assert code == 401
        r = s.client("correct horse battery").chat.completions.create(
            model="default", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert r.choices[0].message.role == "assistant"
    finally:
        s.stop()
    line = one_line_error(cli("serve", bundle, "--host", "0.0.0.0", "--port", str(_port())))
    assert "--api-key" in line


def test_a_full_queue_answers_503_with_retry_after(endless, tmp_path):
    s = Served(endless, tmp_path, "--queue", "1")
    try:
        long = {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3000}
        done = []
        threads = [threading.Thread(target=lambda: done.append(s.post(long)[0])) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.5)  # one running, one queued
        code, err, headers = s.post(long)
        assert code == 503 and int(headers["Retry-After"]) > 0 and err["error"]["code"] == "server_busy"
        for t in threads:
            t.join(300)
        assert done == [200, 200]
    finally:
        s.stop()


def test_fuzzed_request_bodies_get_an_answer_or_a_json_error(server):
    """Whatever the body, a 200 with a completion or a 4xx with OpenAI's error object: never a 500 or a hang."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=False), st.text(max_size=20))
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", 3]),
                                     "content": st.one_of(st.text(max_size=40), scalar)})
    body = st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["default", "nope", 1]), "messages": st.one_of(st.lists(message, max_size=3), scalar),
        "max_tokens": st.one_of(st.integers(-2, 8), scalar), "temperature": scalar, "top_p": scalar, "seed": scalar,
        "stop": st.one_of(st.lists(st.text(max_size=3), max_size=5), scalar), "stream": scalar, "user": scalar,
        "n": scalar})

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(b=st.one_of(body, st.binary(max_size=64)))
    def check(b):
        code, out, _ = server.post(b if isinstance(b, bytes) else json.dumps(b).encode())
        if code == 200:
            assert "choices" in out or "error" in out  # a stream answers 200 with events; plain: a completion
        else:
            assert 400 <= code < 500, (b, code, out)
            assert set(out["error"]) >= {"message", "type", "param", "code"}

    check()
