"""The needle-in-a-haystack harness and the sidecar-off ablation, on the tiny bundle."""

from __future__ import annotations

import numpy as np
import pytest

from cortex_edge.runtime import niah

pytestmark = pytest.mark.aarch64


def test_samples_have_the_length_and_the_needle(engine):
    from cortex_edge.runtime.text import load_tokenizer

    tok = load_tokenizer(engine.bundle.file("tokenizer.json"))

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids

    for length in (300, 1000):
        ids, key, depth = niah.make_sample(enc, length, niah.HELD_OUT_SEED + 7)
        assert len(ids) == length and 0 <= depth <= 1
        assert f"The pass key is {key}." in tok.decode(ids)
        assert tok.decode(ids).endswith(niah.QUESTION)
    assert niah.make_sample(enc, 500, niah.HELD_OUT_SEED + 1)[1] == niah.make_sample(enc, 500, niah.HELD_OUT_SEED + 1)[1]


def test_wilson_interval():
    assert niah.wilson(0, 10)[0] == 0.0 and niah.wilson(10, 10)[1] == 1.0
    lo, hi = niah.wilson(5, 10)
    assert lo < 0.5 < hi


def test_sidecar_off_reads_nothing_and_writes_nothing(engine):
    ids = np.random.default_rng(3).integers(3, engine.cfg.vocab_size, 100)
    on, off = engine.new_state(), engine.new_state()
    l_on = engine.feed(on, ids, all_logits=True)
    l_off = engine.feed(off, ids, all_logits=True, memory=False)
    assert on.events >= 3 and off.events == 0
    assert all(not m.any() for m, _ in off.views)
    first_event = engine.cfg.cms.chunk
    np.testing.assert_allclose(l_on[:first_event], l_off[:first_event], atol=1e-5)  # same until memory holds something
    assert np.abs(l_on[first_event:] - l_off[first_event:]).max() > 1e-3  # builtin:tiny's sidecar is active


def test_run_reports_every_length_and_mode(engine):
    rep = niah.run(engine, [200, 400], 2)
    assert [(r["length"], r["memory"]) for r in rep["rows"]] == [(200, True), (200, False), (400, True), (400, False)]
    for r in rep["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert len(r["cases"]) == 2 and r["chance"] == niah.CHANCE


def test_state_formats_and_the_ablation_each_get_a_row(engine):
    rep = niah.run(engine, [200], 1, (True, False), state_formats=["fp32", "int8"])
    got = [(r["state"], r["memory"]) for r in rep["rows"]]
    assert got == [("fp32", True), ("int8", True), (None, False)]
    assert engine.state_format == engine.bundle.state_format  # restored after the run


def test_the_trained_memory_recalls_beyond_the_window_on_this_cpu(recall_bundle):
    """builtin:recall (int8 weights, int8 state) on held-out seeds at 1k and 4k tokens, where the needle is
    beyond the 64-token window: recalled with the sidecar, never without (the README's table has 100 per
    length, to 64k). Runs on the emulated A76 too."""
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    eng = Engine(load_bundle(recall_bundle), threads=1)
    rep = niah.run(eng, [1024, 4096], 10, (True, False))
    acc = {(r["length"], r["memory"]): r["accuracy"] for r in rep["rows"]}
    assert acc[1024, True] >= 0.9 and acc[4096, True] >= 0.9, acc
    assert acc[1024, False] <= 0.1 and acc[4096, False] <= 0.1, acc
