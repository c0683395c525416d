"""The row level of the CMS: torch reference (TorchStream) and the runtime (graph + runtime/rows.py) agree on
output and state; chunk == token by token; sessions keep the rows; the sidecar-off path never reads them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import requires_torch

pytestmark = requires_torch


@pytest.fixture(scope="module")
def rows_model():
    import torch

    from cortex_edge.config import tiny_rows_config
    from cortex_edge.export.builtin import builtin
    from cortex_edge.model.lm import build

    _, tok, meta = builtin("builtin:tiny")
    m = build(tiny_rows_config(), seed=3)
    with torch.no_grad():  # a gate that lets about half the tokens in
        m.cms_write.rows.gate.weight.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
        m.cms_write.rows.gate.bias.fill_(0.0)
    return m, tok, meta


@pytest.fixture(scope="module")
def rows_bundle(rows_model, tmp_path_factory):
    from cortex_edge.export.bundle_writer import write_bundle

    m, tok, meta = rows_model
    out = tmp_path_factory.mktemp("rows") / "b"
    write_bundle(m, tok, meta, out, weights="fp32", state="fp32", source="builtin:tiny", quiet=True)
    return out


def _ids(n, seed=0, vocab=264):
    return np.random.default_rng(seed).integers(3, vocab, n)


def test_runtime_rows_match_the_torch_reference(rows_model, rows_bundle):
    import torch

    from cortex_edge.model.lm import TorchStream
    from cortex_edge.runtime import rows
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    m, _, _ = rows_model
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
    for j in range(len(ts.row_k)):
        np.testing.assert_allclose(rk[j], ts.row_k[j].numpy(), atol=2e-4)
        np.testing.assert_allclose(rv[j], ts.row_v[j].numpy(), atol=2e-4)
    assert np.max(np.abs(got - ref)) < 2e-3 * max(1.0, np.max(np.abs(ref)))
    # the rows are read: the same stream with the sidecar off computes something else once rows are visible
    off = eng.feed(eng.new_state(), ids, all_logits=True, memory=False)
    assert np.max(np.abs(off[200:] - got[200:])) > 1e-3
    # and nothing before the first row leaves the window (a history that fits the window is the model alone)
    first = min(a for a, _, _ in ts.row_writes) + cfg.window
    np.testing.assert_allclose(off[:first], got[:first], atol=1e-5)


def test_rows_chunk_equals_token_by_token(rows_bundle):
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    eng = Engine(load_bundle(rows_bundle), threads=1)
    ids = _ids(300, seed=5)
    a, b = eng.new_state(), eng.new_state()
    la = eng.feed(a, ids, all_logits=True)
    lb = eng.feed(b, ids, all_logits=True, max_piece=1)
    np.testing.assert_array_equal(a.rows.token, b.rows.token)
    np.testing.assert_allclose(la, lb, atol=1e-4)


def test_rows_writes_only_above_the_threshold_and_keep_the_strongest(rows_model):
    from cortex_edge.runtime import rows
    from cortex_edge.runtime.ring import slot_of

    m, _, _ = rows_model
    cfg = m.cfg
    c = cfg.cms
    rs = rows.empty(cfg, "fp32")
    P = cfg.sinks + cfg.window
    keys = [np.random.default_rng(i).standard_normal((1, cfg.n_kv_heads, P, cfg.head_dim)).astype(np.float32)
            for i in range(cfg.n_layers)]
    vals = [np.random.default_rng(10 + i).standard_normal((1, cfg.n_kv_heads, cfg.head_dim, P)).astype(np.float32)
            for i in range(cfg.n_layers)]
    n = 3 * c.chunk
    g = np.linspace(0.0, 1.0, c.chunk, dtype=np.float32)  # rising gates: the last R above tau win
    rs.pending[:] = g
    writes = rows.event(rs, keys, vals, n, cfg, "fp32")
    assert all(gg > c.rows_threshold for _, _, gg in writes)
    kept = sorted(rs.token.tolist())
    assert kept == list(range(n - c.rows, n))  # the R strongest (latest) tokens
    j = int(np.argmax(rs.token))
    v = rows.views(rs, cfg, "fp32")[1][0][0, :, :, j]  # first row layer's value of the last token
    np.testing.assert_array_equal(v, vals[c.rows_from][0, :, :, int(slot_of(n - 1, cfg.sinks, cfg.window))])
    # a weaker gate does not displace a stronger row
    rs.pending[:] = 0.0
    rs.pending[0] = c.rows_threshold + 0.01
    assert rows.event(rs, keys, vals, n + c.chunk, cfg, "fp32") == []


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
