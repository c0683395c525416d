"""The CMS jump map: torch reference (cortex_edge/model/cms.py) vs NumPy runtime (runtime/cms.py),
on output and state over a grid of configurations, and the true bounds as hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex_edge import contract
from cortex_edge.config import CMSConfig
from cortex_edge.runtime import cms
from tests.conftest import requires_torch

GRID = [
    dict(addressing=a, delta_rule=d, adaptive_decay=ad)
    for a in ("content", "lru", "hybrid") for d in (False, True) for ad in (False, True)
] + [dict(addressing=a, delta_rule=d, adaptive_decay=True, write_threshold=0.5) for a in ("lru", "hybrid") for d in (False, True)]


def small_cfg(**kw) -> CMSConfig:
    base = dict(slots=(4, 8, 16), widths=(8, 12, 16), key_dim=6, event_dim=10, chunk=4, write_every=(1, 2, 3),
                decay=(0.2, 0.05, 0.01))
    base.update(kw)
    return CMSConfig(**base)


@requires_torch
@pytest.mark.parametrize("kw", GRID, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_reference_and_runtime_jump_map_agree(kw):
    import torch

    from cortex_edge.model.cms import CMSWriter, empty_state

    cfg = small_cfg(**kw)
    torch.manual_seed(0)
    w = CMSWriter(cfg)
    with torch.no_grad():
        for p in w.parameters():
            p.normal_(0, 0.5)
    weights = w.numpy_weights()
    mems, keys, usage = empty_state(cfg)
    levels = cms.empty_levels(cfg)
    rng = np.random.default_rng(1)
    gates = []
    for event in range(1, 41):
        s = rng.standard_normal(cfg.event_dim).astype(np.float32)
        with torch.no_grad():
            mems, keys, usage, tinfo = w.event_step(mems, keys, usage, torch.from_numpy(s)[None], event)
        levels, ninfo = cms.event_step(levels, s, event, weights, cfg)
        for lvl in range(cfg.levels):
            np.testing.assert_allclose(levels[lvl].mem, mems[lvl][0].numpy(), atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(levels[lvl].keys, keys[lvl][0].numpy(), atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(levels[lvl].usage, usage[lvl][0].numpy(), atol=2e-5, rtol=1e-4)
            if tinfo["gate"][lvl] is None:
                assert np.isnan(ninfo["gate"][lvl])
            else:
                assert ninfo["gate"][lvl] == pytest.approx(float(tinfo["gate"][lvl]), abs=1e-5)
                gates.append(ninfo["gate"][lvl])
    assert any(np.abs(lv.mem).sum() > 0 for lv in levels)  # the memory was actually written
    if cfg.write_threshold:  # both branches of the sparse write were taken
        assert 0 < sum(g == 0.0 for g in gates) < len(gates)


def test_sparse_write_below_threshold_only_decays():
    """Gate under write_threshold: memory and keys decay, nothing is written, and the LRU pointer stays."""
    cfg = small_cfg(addressing="lru", adaptive_decay=False, write_threshold=0.99)
    rng = np.random.default_rng(3)
    w = cms.random_write_weights(cfg, seed=0)
    for lvl in range(cfg.levels):
        w[contract.write_param(lvl, "gate.bias")][:] = -20.0  # sigmoid ~ 2e-9 << 0.99
    levels = [cms.Level(rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, cfg.key_dim)).astype(np.float32),
                        rng.random(n).astype(np.float32)) for n, d in zip(cfg.slots, cfg.widths)]
    out, info = cms.event_step(levels, rng.standard_normal(cfg.event_dim).astype(np.float32), 6, w, cfg)
    for lvl, (a, b) in enumerate(zip(levels, out)):
        keep = np.float32(1 - cfg.decay[lvl])
        np.testing.assert_allclose(b.mem, keep * a.mem, rtol=1e-6)
        np.testing.assert_allclose(b.keys, keep * a.keys, rtol=1e-6)
        np.testing.assert_allclose(b.usage, keep * a.usage, rtol=1e-6)
        assert info["gate"][lvl] == 0.0
    assert cms.sparse_gate(0.75, 0.5) == pytest.approx(0.5) and cms.sparse_gate(0.3, 0.0) == 0.3


@requires_torch
def test_reference_read_matches_numpy_read():
    import torch

    from cortex_edge.model.cms import CMSWriter

    cfg = small_cfg()
    w = CMSWriter(cfg)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((16, 16)).astype(np.float32)
    k = rng.standard_normal((16, 6)).astype(np.float32)
    q = rng.standard_normal(6).astype(np.float32)
    ref = w.read(torch.from_numpy(m)[None], torch.from_numpy(k)[None], torch.from_numpy(q)[None])[0].numpy()
    np.testing.assert_allclose(cms.read(m, k, q), ref, atol=1e-5)


# ---------------------------------------------------------------- properties (NumPy jump map)

def _vec(n, lo=-3.0, hi=3.0):
    return st.lists(st.floats(lo, hi, allow_nan=False, width=32), min_size=n, max_size=n).map(
        lambda x: np.array(x, dtype=np.float32))


def _address(kind: str, n: int, raw: np.ndarray) -> np.ndarray:
    if kind == "onehot":
        a = np.zeros(n, np.float32)
        a[int(np.argmax(raw))] = 1.0
        return a
    e = np.exp(raw - raw.max())
    return (e / e.sum()).astype(np.float32)


@settings(max_examples=200, deadline=None)
@given(m=_vec(4 * 5), d=st.floats(0.001, 0.9), delta=st.booleans())
def test_zero_gate_is_pure_decay(m, d, delta):
    lv = cms.Level(m.reshape(4, 5), m[:12].reshape(4, 3), np.zeros(4, np.float32))
    a = _address("soft", 4, np.arange(4, dtype=np.float32))
    out = cms.apply_write(lv, a, 0.0, np.ones(5, np.float32), np.ones(3, np.float32), d, delta)
    np.testing.assert_allclose(out.mem, np.float32(1 - d) * lv.mem, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.keys, np.float32(1 - d) * lv.keys, rtol=1e-6, atol=1e-7)


@settings(max_examples=150, deadline=None)
@given(m0=_vec(6 * 4, -5, 5), d=st.floats(0.01, 0.5), delta=st.booleans(), kind=st.sampled_from(["soft", "onehot"]),
       seed=st.integers(0, 2**31 - 1), vmax=st.floats(0.1, 10.0))
def test_norm_never_exceeds_tight_bound(m0, d, delta, kind, seed, vmax):
    """||M_t||_F <= max(||M_0||_F, V_max / d) when g <= 1, ||a||_2 <= 1 (the corrected Theorem 1)."""
    rng = np.random.default_rng(seed)
    lv = cms.Level(m0.reshape(6, 4), np.zeros((6, 2), np.float32), np.zeros(6, np.float32))
    bound = cms.norm_bound(float(np.linalg.norm(lv.mem)), vmax, d)
    for _ in range(60):
        v = rng.standard_normal(4).astype(np.float32)
        v *= vmax * rng.uniform(0, 1) / max(np.linalg.norm(v), 1e-12)
        a = _address(kind, 6, rng.standard_normal(6).astype(np.float32))
        lv = cms.apply_write(lv, a, float(rng.uniform(0, 1)), v, np.zeros(2, np.float32), d, delta)
        assert np.linalg.norm(lv.mem) <= bound * (1 + 1e-5) + 1e-6


@settings(max_examples=100, deadline=None)
@given(v=_vec(5, -2, 2), g=st.floats(0.05, 1.0), d=st.floats(0.05, 0.5))
def test_saturation_limit(v, g, d):
    """Constant writes (one-hot address, no delta rule) converge to (g / d) a ⊗ v (Theorem 3)."""
    a = np.zeros(3, np.float32)
    a[1] = 1.0
    lv = cms.Level(np.zeros((3, 5), np.float32), np.zeros((3, 2), np.float32), np.zeros(3, np.float32))
    for _ in range(int(np.ceil(np.log(1e-6) / np.log(1 - d))) + 5):
        lv = cms.apply_write(lv, a, g, v, np.zeros(2, np.float32), d, False)
    np.testing.assert_allclose(lv.mem, (g / d) * np.outer(a, v), rtol=1e-3, atol=1e-4)


@settings(max_examples=100, deadline=None)
@given(m=_vec(3 * 4, -10, 10), d=st.floats(1e-4, 0.99))
def test_nothing_grows_without_writes(m, d):
    lv = cms.Level(m.reshape(3, 4), m[:6].reshape(3, 2), np.zeros(3, np.float32))
    a = _address("soft", 3, np.zeros(3, np.float32))
    prev = np.linalg.norm(lv.mem)
    for _ in range(20):
        lv = cms.apply_write(lv, a, 0.0, np.full(4, 100, np.float32), np.zeros(2, np.float32), d, False)
        now = np.linalg.norm(lv.mem)
        assert now <= prev + 1e-6
        prev = now


def test_event_step_respects_bound_with_trained_shapes():
    """Full event_step over many events: every level stays under max(||M_0||, V_max / d_l)."""
    cfg = small_cfg(addressing="hybrid")
    rng = np.random.default_rng(3)
    w = {k: v * 3 for k, v in cms.random_write_weights(cfg, seed=3).items()}
    vmax = cms.value_bound(w, cfg)
    levels = cms.empty_levels(cfg)
    for e in range(1, 500):
        levels, _ = cms.event_step(levels, rng.standard_normal(cfg.event_dim).astype(np.float32) * 5, e, w, cfg)
        for lvl, lv in enumerate(levels):
            assert np.linalg.norm(lv.mem) <= cms.norm_bound(0.0, vmax[lvl], cfg.decay[lvl]) * (1 + 1e-5)
