"""Chat turns: commit whole or not at all (Ctrl-C), template deltas, long prompts in bounded pieces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cortex_edge.runtime.sampling import Sampling
from tests.conftest import EMULATED

pytestmark = pytest.mark.aarch64


def test_interrupted_turn_leaves_state_untouched(engine, monkeypatch):
    from cortex_edge.runtime.chat import Chat

    c = Chat(engine)
    list(c.turn("first", Sampling(temperature=0), 5))
    before = c.state.copy()
    calls = {"n": 0}
    real = engine.feed

    def flaky(st, ids, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(st, ids, **kw)

    monkeypatch.setattr(engine, "feed", flaky)
    with pytest.raises(KeyboardInterrupt):
        list(c.turn("second", Sampling(temperature=0), 50))
    monkeypatch.setattr(engine, "feed", real)
    assert c.state.n == before.n and c.turns == 1
    for x, y in zip(c.state.keys + c.state.values, before.keys + before.values):
        np.testing.assert_array_equal(x, y)


def test_turns_feed_only_the_template_delta(engine):
    from cortex_edge.runtime.chat import Chat

    c = Chat(engine)
    list(c.turn("hello", Sampling(temperature=0), 4))
    n1 = c.state.n
    assert "".join(t for t, _ in c.fmt.first_turn("hello")).startswith("<|im_start|>system")
    delta = c.fmt.next_turn("again")
    assert delta == [("<|im_start|>user\n", False), ("again", True), ("<|im_end|>\n<|im_start|>assistant\n", False)]
    list(c.turn("again", Sampling(temperature=0), 4))
    assert c.state.n > n1
    assert c.fmt.assistant_suffix() == "<|im_end|>\n"


def test_long_prompt_is_processed_in_bounded_pieces(engine):
    import psutil

    from cortex_edge.runtime.chat import Chat

    c = Chat(engine)
    text = "word " * (2_000 if EMULATED else 40_000)  # 200k characters (10k under emulation)
    rss0 = psutil.Process().memory_info().rss
    list(c.turn(text, Sampling(temperature=0), 2))
    grown = psutil.Process().memory_info().rss - rss0
    assert c.state.n > len(text)
    assert grown < 200 << 20  # tokens ids and pieces only; no per-token state kept


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child")
@pytest.mark.skipif(EMULATED, reason="qemu-user does not deliver SIGINT to the emulated child as a "
                    "KeyboardInterrupt; this tests Python signal handling, which runs natively in the default suite")
def test_ctrl_c_in_repl_drops_the_turn_and_keeps_the_session(engine, tmp_path):
    env = {**os.environ, "CORTEX_EDGE_HOME": str(tmp_path)}
    b = str(engine.bundle.path)
    r = subprocess.run([sys.executable, "-m", "cortex_edge", "chat", b, "--prompt", "one", "--max-new-tokens", "3"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = (tmp_path / "sessions" / "default.cxs").read_bytes()
    p = subprocess.Popen([sys.executable, "-m", "cortex_edge", "chat", b, "--max-new-tokens", "1000000",
                          "--temperature", "1.0", "--ignore-eos"], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         # a user's terminal delivers SIGINT with its default disposition; a suite started
                         # in the background (`cmd &` without job control) would pass it on ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _ctrl_c_scenario(p, saved, tmp_path)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _ctrl_c_scenario(p, saved, tmp_path):
    p.stdin.write(b"tell me everything\n")
    p.stdin.flush()
    import select

    got, deadline = b"", time.time() + 600
    want = len("> assistant> ") + 12  # the prompt and the answer's label, then 12 streamed answer bytes
    while len(got) < want and time.time() < deadline:
        if select.select([p.stdout], [], [], 1.0)[0]:
            got += os.read(p.stdout.fileno(), 64)
    assert len(got) >= want, got  # generation is under way (it cannot end: --ignore-eos, 10^6 tokens)
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)
    p.stdin.write(b"/quit\n")
    p.stdin.flush()
    _, err = p.communicate(timeout=300)
    err = err.decode("utf-8", "replace")
    assert p.returncode == 0, err
    assert "not kept" in err
    assert (tmp_path / "sessions" / "default.cxs").read_bytes() == saved


@pytest.mark.slow
def test_million_character_prompt(engine):
    import psutil

    from cortex_edge.runtime.chat import Chat

    c = Chat(engine)
    rss0 = psutil.Process().memory_info().rss
    list(c.turn("abcd " * 200_000, Sampling(temperature=0), 2))  # 1,000,000 characters
    assert c.state.n > 1_000_000
    assert psutil.Process().memory_info().rss - rss0 < 300 << 20


def test_stop_strings_end_the_answer_before_them(engine):
    from cortex_edge.runtime.chat import Chat

    greedy = Sampling(temperature=0, repeat_penalty=1.0)
    c = Chat(engine)
    c.stop_ids = set()
    full = "".join(c.turn("hello", greedy, 40))
    assert len(full) > 10
    stop = full[6:9]
    c.reset()
    cut = "".join(c.turn("hello", greedy, 40, stop=("never there", stop)))
    assert cut == full[:full.index(stop)]
    c.reset()
    assert "".join(c.turn("hello", greedy, 40, stop=("never there",))) == full


def test_repeat_penalty_is_llama_cpps():
    from hypothesis import given
    from hypothesis import strategies as hst

    from cortex_edge.runtime.sampling import penalize

    @given(hst.lists(hst.floats(-50, 50), min_size=4, max_size=32), hst.lists(hst.integers(0, 3), max_size=8),
           hst.floats(1.0, 3.0))
    def check(logits, recent, penalty):
        x = np.array(logits, np.float32)
        y = penalize(x, recent, penalty)
        for i in range(len(x)):
            if i in recent:
                want = x[i] / penalty if x[i] > 0 else x[i] * penalty
                assert np.isclose(y[i], want)
                assert y[i] <= x[i]  # a repeated token never becomes more likely
            else:
                assert y[i] == x[i]

    check()
