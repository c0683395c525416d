"""The row level of the CMS: torch reference (TorchStream) and the runtime (graph + runtime/rows.py) agree on
output and state; chunk == token by token; sessions keep the rows; the sidecar-off path never reads them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import requires_torch

pytestmark = requires_torch


def _rows_model(place: str = "slot"):
    import dataclasses

    import torch

    from cortex_edge.config import tiny_rows_config
    from cortex_edge.export.builtin import builtin
    from cortex_edge.model.lm import build

    _, tok, meta = builtin("builtin:tiny")
    cfg = tiny_rows_config()
    # a gap, a row bias and a key scale, so that the reference and the runtime are compared with them
    gap, bias, scale = (3, 1.5, 1.25) if place == "recency" else (0, 0.0, 1.0)
    m = build(dataclasses.replace(cfg, cms=dataclasses.replace(cfg.cms, rows_place=place, rows_gap=gap,
                                                               rows_bias=bias, rows_key_scale=scale)), seed=3)
    with torch.no_grad():  # a gate that lets about half the tokens in
        m.cms_write.rows.gate.weight.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
        m.cms_write.rows.gate.bias.fill_(0.0)
    if place == "recency":  # made as the default chat is: a backbone without rows, then the sidecar attached
        from cortex_edge.config import tiny_config
        from cortex_edge.model import rows_train

        w = m.cms_write.rows
        tensors = {"cms_read.norm_in.weight": m.cms_read.norm_in.weight, "cms_read.compress.weight":
                   m.cms_read.compress.weight, "rows.z.weight": w.z.weight, "rows.z.bias": w.z.bias,
                   "rows.gate.weight": w.gate.weight, "rows.gate.bias": w.gate.bias}
        assert set(tensors) == set(rows_train.GATE_NAMES)
        m = rows_train.attach(build(tiny_config(), seed=3), m.cfg.cms, m.cfg.memory_layer, tensors)
    return m, tok, meta


@pytest.fixture(scope="module")
def rows_model():
    return _rows_model()


@pytest.fixture(scope="module")
def rows_model_recency():
    return _rows_model("recency")


def _write(model, tmp_path_factory):
    from cortex_edge.export.bundle_writer import write_bundle

    m, tok, meta = model
    out = tmp_path_factory.mktemp("rows") / "b"
    write_bundle(m, tok, meta, out, weights="fp32", state="fp32", source="builtin:tiny", quiet=True)
    return out


@pytest.fixture(scope="module")
def rows_bundle(rows_model, tmp_path_factory):
    return _write(rows_model, tmp_path_factory)


@pytest.fixture(scope="module")
def rows_bundle_recency(rows_model_recency, tmp_path_factory):
    return _write(rows_model_recency, tmp_path_factory)


@pytest.fixture(params=["slot", "recency"])
def placed(request):
    """(model, bundle) for each way a row is placed for reading (config.rows_place)."""
    if request.param == "slot":
        return request.getfixturevalue("rows_model"), request.getfixturevalue("rows_bundle")
    return request.getfixturevalue("rows_model_recency"), request.getfixturevalue("rows_bundle_recency")


def _ids(n, seed=0, vocab=264):
    return np.random.default_rng(seed).integers(3, vocab, n)


def test_runtime_rows_match_the_torch_reference(placed):
    import torch

    from cortex_edge.model.lm import TorchStream
    from cortex_edge.runtime import rows
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    (m, _, _), rows_bundle = placed
    cfg = m.cfg
    ids = _ids(400)  # the window is 48: many rows leave it and are read
    with torch.no_grad():
        ts = TorchStream(m)
        ref = ts.feed(torch.from_numpy(ids)[None])[0].numpy()
    eng = Engine(load_bundle(rows_bundle), threads=1)
    st = eng.new_state()
    got = eng.feed(st, ids, all_logits=True)
    assert len(ts.row_writes) > cfg.cms.rows  # slots were reused
    np.testing.assert_array_equal(st.rows.token, ts.row_token[0].numpy())
    np.testing.assert_allclose(st.rows.usage, ts.row_usage[0].numpy(), rtol=1e-5)
    rk, rv = rows.views(st.rows, cfg, "fp32")
    read = ts.row_keys_read()
    for j in range(len(ts.row_k)):
        np.testing.assert_allclose(rk[j], read[j][0].numpy(), atol=2e-4)
        np.testing.assert_allclose(rv[j], ts.row_v[j][0].numpy(), atol=2e-4)
    assert np.max(np.abs(got - ref)) < 2e-3 * max(1.0, np.max(np.abs(ref)))
    # the rows are read: the same stream with the sidecar off computes something else once rows are visible
    off = eng.feed(eng.new_state(), ids, all_logits=True, memory=False)
    assert np.max(np.abs(off[200:] - got[200:])) > 1e-3
    # and nothing before the first row leaves the window (a history that fits the window is the model alone)
    first = min(a for a, _, _ in ts.row_writes) + cfg.window
    np.testing.assert_allclose(off[:first], got[:first], atol=1e-5)


def test_rows_chunk_equals_token_by_token(placed):
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    _, rows_bundle = placed

    eng = Engine(load_bundle(rows_bundle), threads=1)
    ids = _ids(300, seed=5)
    a, b = eng.new_state(), eng.new_state()
    la = eng.feed(a, ids, all_logits=True)
    lb = eng.feed(b, ids, all_logits=True, max_piece=1)
    np.testing.assert_array_equal(a.rows.token, b.rows.token)
    np.testing.assert_allclose(la, lb, atol=1e-4)


def test_rows_writes_only_above_the_threshold_and_keep_the_strongest(rows_model):
    from cortex_edge.runtime import ring, rows

    m, _, _ = rows_model
    cfg = m.cfg
    c = cfg.cms
    rs = rows.empty(cfg, "fp32")
    lay = ring.Layout.of(cfg)
    M = lay.capacity
    keys = [np.random.default_rng(i).standard_normal((1, cfg.n_kv_heads, M, cfg.head_dim)).astype(np.float32)
            for i in range(cfg.n_layers)]
    vals = [np.random.default_rng(10 + i).standard_normal((1, cfg.n_kv_heads, M, cfg.head_dim)).astype(np.float32)
            for i in range(cfg.n_layers)]
    n = 3 * c.chunk
    C = c.chunk
    g = np.linspace(0.0, 1.0, C, dtype=np.float32)  # rising gates: the last R above tau win
    rs.pending[:C] = g  # the previous chunk's gates: committed at this event
    writes = rows.event(rs, keys, vals, n, cfg, "fp32")
    assert all(gg > c.rows_threshold for _, _, gg in writes)
    kept = sorted(rs.token.tolist())
    assert kept == list(range(n - C - c.rows, n - C))  # the R strongest (latest) tokens of the chunk before last
    j = int(np.argmax(rs.token))
    v = rows.views(rs, cfg, "fp32")[1][0][:, j]  # first row layer's value of the last token
    np.testing.assert_array_equal(v, vals[c.rows_from][0, :, int(lay.index(n - C - 1, n - C))])
    # a weaker gate does not displace a stronger row
    rs.pending[:] = 0.0
    rs.pending[0] = c.rows_threshold + 0.01
    assert rows.event(rs, keys, vals, n + C, cfg, "fp32") == []


def test_rows_lookahead_keeps_the_tokens_just_before_a_gate(rows_model):
    """A value stated first ("Pixel is the name of my cat") is kept when the gate fires within L tokens after it,
    also across the chunk boundary (the lookahead reads the next chunk's first gates)."""
    from cortex_edge.runtime import rows

    m, _, _ = rows_model
    cfg = m.cfg
    c = cfg.cms
    C, L = c.chunk, c.rows_lookahead
    assert L >= 1
    from cortex_edge.runtime import ring

    M = ring.Layout.of(cfg).capacity
    keys = [np.zeros((1, cfg.n_kv_heads, M, cfg.head_dim), np.float32) for _ in range(cfg.n_layers)]
    vals = [np.zeros((1, cfg.n_kv_heads, M, cfg.head_dim), np.float32) for _ in range(cfg.n_layers)]
    rs = rows.empty(cfg, "fp32")
    n = 4 * C
    rs.pending[5] = 0.9  # token n - 2C + 5 fires: it and the L before it are kept, nothing else
    rs.pending[C] = 0.8  # the current chunk's first token fires: the previous chunk's last L tokens are kept
    writes = rows.event(rs, keys, vals, n, cfg, "fp32")
    base = n - 2 * C
    assert sorted(a for a, _, _ in writes) == list(range(base + 5 - L, base + 6)) + list(range(base + C - L, base + C))
    assert {a: g for a, _, g in writes}[base + 5 - L] == pytest.approx(0.9)
    # the current chunk's gates move down: committed at the next event, no longer looked at from the old chunk
    assert rs.pending[0] == pytest.approx(0.8) and not np.any(rs.pending[C:])


def test_sessions_keep_the_rows(rows_bundle, tmp_path):
    from cortex_edge.runtime import session
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    eng = Engine(load_bundle(rows_bundle), threads=1)
    st = eng.new_state()
    eng.feed(st, _ids(250, seed=2))
    p = tmp_path / "s.cxs"
    session.save(p, eng, st)
    st2, _ = session.load(p, eng)[:2]
    np.testing.assert_array_equal(st2.rows.token, st.rows.token)
    np.testing.assert_array_equal(st2.rows.pending, st.rows.pending)
    nxt = _ids(40, seed=9)
    np.testing.assert_allclose(eng.feed(st2, nxt), eng.feed(st, nxt), atol=1e-6)


@pytest.mark.slow
def test_the_default_chat_remembers_a_fact_beyond_its_window_across_processes(tmp_path):
    """The issue's journey through the CLI: a fact told with `chat --session S --prompt`, long turns after it (each
    a new process) until the fact has left the 1,024-token window, then the question. Greedy."""
    import os
    import subprocess
    import sys

    try:
        from cortex_edge.export.loaders import smollm2_path

        smollm2_path()
    except Exception as e:
        pytest.skip(str(e))
    from cortex_edge.runtime import memory_tasks as mt

    env = {**os.environ, "CORTEX_EDGE_HOME": str(tmp_path / "home")}

    def chat(prompt):
        r = subprocess.run([sys.executable, "-m", "cortex_edge", "chat", "--session", "mem", "--prompt", prompt,
                            "--temperature", "0", "--max-new-tokens", "24", "--threads", "2"],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    chat("My cat is called Pixel.")
    verses = mt.genesis_verses()
    for i in range(4):  # about 1,600 tokens of other conversation
        chat("Here is a passage I am reading: " + " ".join(verses[40 * i:40 * i + 12]) + " What do you think of it?")
    from cortex_edge.runtime import session

    d = session.describe(tmp_path / "home" / "sessions" / "mem.cxs")
    assert d["tokens"] > 1028 + 60, d  # the fact (in the first ~60 tokens) is out of the window
    answer = chat("What is my cat called?")
    assert "pixel" in answer.lower(), answer


def test_the_shipped_sidecar_fits_one_a76_core_l2():
    """The default chat's whole CMS state (row level + residual level, int8) within 512 KiB."""
    import dataclasses

    from cortex_edge.config import ModelConfig
    from cortex_edge.export.pipeline import SMOLLM2_SIDECAR
    from cortex_edge.model import rows_train
    from cortex_edge.quantize import state_codec
    from cortex_edge.runtime import cms, rows

    c, layer, tensors, info = rows_train.load_sidecar(SMOLLM2_SIDECAR)
    cfg = dataclasses.replace(ModelConfig(), cms=c, memory_layer=layer)  # SmolLM2-135M's shape
    cfg.validate()
    rs = rows.empty(cfg, "int8")
    size = state_codec.nbytes(rs.keys) + state_codec.nbytes(rs.values) + rs.usage.nbytes + rs.token.nbytes
    for lv in cms.empty_levels(c):
        size += state_codec.nbytes(state_codec.encode(lv.mem, "int8")[0]) + \
            state_codec.nbytes(state_codec.encode(lv.keys, "int8")[0]) + lv.usage.nbytes
    assert size <= 512 * 1024, size
    assert c.rows_from == 8 and 0 < c.rows_threshold < 1 and info["source"] == "smollm2"
    # the shipped file is what the recipe writes: the read threshold above the gate's precision floor, keys louder
    assert c.rows_threshold == info["threshold"] == max(info["precision_floor"], rows_train.READ_THRESHOLD)
    assert c.rows_key_scale == rows_train.ROWS_KEY_SCALE and c.rows_lookahead == info["lookahead"]
    assert info["validation"]["precision"] >= info["validation_floor"]["precision"] >= rows_train.TARGET_PRECISION


def test_gate_training_learns_and_the_sidecar_round_trips(tmp_path):
    import torch

    from cortex_edge.config import CMSConfig
    from cortex_edge.model import rows_train
    from cortex_edge.runtime.errors import CortexError

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4000, 32, generator=g)
    y = (h[:, 0] + 0.5 * h[:, 1] > 1.0).float()  # a direction of the hidden state marks the tokens to keep
    gate = rows_train.train_gate(h, y, 32, 16, 1e-5, steps=300, batch=512, lr=1e-2)
    rep = rows_train.gate_report(gate, h, y, (0.5,))["0.5"]
    assert rep["recall"] > 0.9 and rep["precision"] > 0.8
    cms = CMSConfig(slots=(4,), widths=(8,), key_dim=8, event_dim=16, chunk=16, write_every=(1,), decay=(0.05,),
                    rows=8, rows_from=1, rows_threshold=0.5)
    p = tmp_path / "s.safetensors"
    rows_train.save_sidecar(p, gate, cms, 0, {"source": "test"})
    c2, layer, tensors, info = rows_train.load_sidecar(p)
    assert c2 == cms and layer == 0 and info == {"source": "test"}
    assert torch.equal(tensors["rows.gate.weight"], gate.g_w.detach())
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(CortexError, match="not a cortex-edge sidecar"):
        rows_train.load_sidecar(bad)
    from cortex_edge.export.builtin import builtin

    tiny, _, _ = builtin("builtin:tiny")  # width 64, the sidecar was made for width 32
    with pytest.raises(CortexError, match="width"):
        rows_train.attach(tiny, cms, 0, tensors)


def test_the_lookahead_is_measured_per_sequence_and_chosen_smallest():
    from cortex_edge.model import rows_train

    g = np.array([0, 0, 0.9, 0, 0, 0.9, 0, 0, 0.9], np.float32)  # two sequences: 5 tokens, then 4
    y = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1], np.float32)
    rep = rows_train.lookahead_report(g, y, [5, 4], 0.5, lookaheads=(0, 1, 2))
    assert rep["0"]["recall"] == pytest.approx(3 / 6) and rep["0"]["false_positive_rate"] == 0.0
    assert rep["1"]["recall"] == pytest.approx(5 / 6) and rep["1"]["false_positive_rate"] == 0.0
    # the first sequence's last tokens never look into the second sequence (its first gate is 0.9)
    assert rep["2"]["recall"] == 1.0 and rep["2"]["false_positive_rate"] == pytest.approx(1 / 3)
    assert rows_train.choose_lookahead(rep) == 2


def test_memory_tasks_hold_out_wordings_and_talk():
    from cortex_edge.runtime import memory_tasks as mt

    def count(s):
        return len(s.split())

    seen = [mt.conversation(s, 3, 200, count) for s in range(30)]
    held = [mt.conversation(mt.HELD_OUT_SEED + s, 3, 200, count, held_out=True, talk=mt.HELD_OUT_TALK)
            for s in range(30)]
    kind = {k.name: k for k in mt.KINDS}
    for c in seen:
        text = " ".join(m["content"] for m in c.messages)
        assert all(f.statement[1:] in text for f in c.facts)  # (a second fact in a message starts lower-case)
        assert not any(f.question == kind[f.kind].questions[-1] for f in c.facts)
        assert not any(f.statement == kind[f.kind].statements[-1].format(v=f.value) for f in c.facts)
        assert not any(d in text for d in mt.DISHES)  # the held-out talk never appears
    for c in held:
        assert all(f.question == kind[f.kind].questions[-1] for f in c.facts)
        assert all(f.statement == kind[f.kind].statements[-1].format(v=f.value) for f in c.facts)
        assert c.talk == mt.HELD_OUT_TALK


def test_training_filler_keeps_the_pass_key_haystack_out():
    """The training's repetitive haystacks never hold a sentence of the pass-key evaluation's filler: that one
    stays a held-out haystack."""
    from cortex_edge.runtime import memory_tasks as mt
    from cortex_edge.runtime.niah import FILLER

    held = {s.strip() + "." for s in FILLER.split(".") if s.strip()}
    units = [mt.filler_unit(np.random.default_rng(s)) for s in range(300)]
    drawn = {s.strip() + "." for u in units for s in u.split(".") if s.strip()}
    assert len(drawn) > 50  # many distinct sentences, none of them the evaluation's
    assert not drawn & held


def test_recency_reads_the_held_rows_in_token_order_newest_nearest(rows_model_recency):
    import dataclasses

    from cortex_edge.quantize import state_codec
    from cortex_edge.runtime import ring, rows

    m, _, _ = rows_model_recency
    cfg = dataclasses.replace(m.cfg, cms=dataclasses.replace(m.cfg.cms, rows_gap=0))
    R, S, W, hd = cfg.cms.rows, cfg.sinks, cfg.window, cfg.head_dim
    rs = rows.empty(cfg, "fp32")
    rs.token[:] = -1
    rs.token[[1, 2, 5, 6]] = [70, 10, 90, 50]  # slots hold tokens out of order, as LRU leaves them
    stored = np.random.default_rng(0).standard_normal(state_codec.decode(rs.keys, "fp32").shape).astype(np.float32)
    rs.keys = state_codec.encode(stored, "fp32")[0]
    pos = rows.read_position(rs.token, cfg)
    assert [pos[j] for j in (5, 1, 6, 2)] == [S + W - 2 - k for k in range(4)]  # 90, 70, 50, 10: distance 1..4
    gapped = dataclasses.replace(cfg, cms=dataclasses.replace(cfg.cms, rows_gap=5))
    assert [rows.read_position(rs.token, gapped)[j] for j in (5, 1, 6, 2)] == [S + W - 7 - k for k in range(4)]
    empty = [j for j in range(R) if rs.token[j] < 0]
    np.testing.assert_array_equal(pos[empty], rows.row_position(np.array(empty), cfg))
    rk, _ = rows.views(rs, cfg, "fp32")
    per_slot = stored.reshape(R, len(rk), cfg.n_kv_heads, hd)
    for j in (1, 2, 5, 6):
        want = ring.rotate(per_slot[j, 0], int(pos[j] - rows.row_position(j, cfg)), cfg.rope_theta)
        np.testing.assert_allclose(rk[0][:, j], want * cfg.cms.rows_key_scale, atol=1e-6)
    assert cfg.cms.rows_key_scale == 1.25
    np.testing.assert_array_equal(rk[0][:, 0], per_slot[0, 0] * np.float32(1.25))  # an empty slot is not moved


def test_the_row_bias_and_key_scale_change_only_visible_rows_logits_and_are_read(rows_bundle_recency):
    import dataclasses

    from cortex_edge.runtime import ring, rows
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    m = rows.mask(np.array([3, -1, 60]), np.array([70, 110]), window=48, bias=1.5)
    np.testing.assert_array_equal(m, [[1.5, ring.NEG_INF, ring.NEG_INF], [1.5, ring.NEG_INF, 1.5]])
    eng = Engine(load_bundle(rows_bundle_recency), threads=1)
    # the bundle carries them (the torch parity tests run with them)
    assert (eng.cfg.cms.rows_bias, eng.cfg.cms.rows_key_scale) == (1.5, 1.25)
    ids = _ids(300, seed=7)
    louder = eng.feed(eng.new_state(), ids, all_logits=True)
    base = eng.cfg
    first = base.window + 1  # no row is visible before its token has left the window
    for change in ({"rows_bias": 0.0}, {"rows_key_scale": 4.0}):  # (this random model's row logits are small)
        eng.cfg = dataclasses.replace(base, cms=dataclasses.replace(base.cms, **change))
        plain = eng.feed(eng.new_state(), ids, all_logits=True)
        np.testing.assert_allclose(louder[:first], plain[:first], atol=1e-5)
        assert np.max(np.abs(louder[200:] - plain[200:])) > 1e-3, change
    eng.cfg = base


def test_an_answer_counts_only_the_whole_value():
    from cortex_edge.runtime.memory_tasks import answer_contains

    assert answer_contains("Your birthday is June 2nd.", "June 2")
    assert not answer_contains("June 21st.", "June 2")  # another date that starts with the value
    assert answer_contains("The code is 7595.", "7595") and not answer_contains("It is 17595", "7595")
    assert answer_contains("PIXEL's bowl", "Pixel") and not answer_contains("Pixels", "Pixel")
