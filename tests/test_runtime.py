"""The NumPy runtime alone (no torch): chunk == token by token, state codecs, sampling, bundle checks.
These also run on the emulated Cortex-A76 (marker aarch64)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex_edge import contract
from cortex_edge.quantize import state_codec
from cortex_edge.runtime.sampling import Sampling, sample
from tests.conftest import requires_torch

pytestmark = pytest.mark.aarch64


def _chunk_vs_token(engine, tol):
    ids = np.random.default_rng(5).integers(3, engine.cfg.vocab_size, 150)
    a, b = engine.new_state(), engine.new_state()
    la = engine.feed(a, ids, all_logits=True)
    lb = engine.feed(b, ids, max_piece=1, all_logits=True)
    assert a.events == b.events >= 3 and a.n > engine.cfg.sinks + engine.cfg.window
    tol = tol * max(1.0, float(np.abs(la).max()))
    np.testing.assert_allclose(la, lb, atol=tol)
    assert np.mean(la.argmax(-1) == lb.argmax(-1)) >= 0.95
    for (m1, k1), (m2, k2) in zip(a.views, b.views):
        np.testing.assert_allclose(m1, m2, atol=tol)
        np.testing.assert_allclose(k1, k2, atol=tol)
    assert b.placed == engine.lay.sink_delta(b.n - 1) and a.placed == 0  # the last step's own placement
    engine.place(b, 0)  # both in the sinks' own frame: then the whole buffers agree
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        np.testing.assert_allclose(x, y, atol=tol)


def test_runtime_chunk_equals_token_by_token(engine):
    """int8 weights: MatMulNBits quantizes activations per row and its one-row and many-row kernels
    round differently, so chunk and token paths agree to quantization noise (fp32: see below)."""
    _chunk_vs_token(engine, contract.RTOL_PATHS[engine.bundle.weights])


@requires_torch
def test_runtime_chunk_equals_token_by_token_fp32(bundle_fp32):
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    _chunk_vs_token(Engine(load_bundle(bundle_fp32), threads=1), contract.RTOL_PATHS["fp32"])


def test_state_is_bounded(engine):
    c = engine.cfg
    st = engine.new_state()
    engine.feed(st, np.full(c.sinks + c.window + 10, 7))  # the window is full from here on
    size = sum(x.nbytes for x in st.keys + st.values) + sum(engine.state_bytes(st))
    assert st.keys[0].shape[2] == engine.lay.capacity
    engine.feed(st, np.full(500, 7))
    assert sum(x.nbytes for x in st.keys + st.values) + sum(engine.state_bytes(st)) == size
    assert all(np.isfinite(m).all() for m, _ in st.views)


def _reads_only_rows_in_use(engine):
    """The graph reads the buffer rows in use and nothing beyond (a short history reads a short buffer): junk
    written past them changes no logit, token by token and by chunks, while the history grows through several
    moves of the region; and the runtime keeps those rows zero."""
    c = engine.cfg
    ids = np.random.default_rng(9).integers(3, c.vocab_size, 3 * c.window + 40)
    for piece in (1, None):
        a, b = engine.new_state(), engine.new_state()
        for j in range(0, ids.size, 8):
            la = engine.feed(a, ids[j:j + 8], max_piece=piece, all_logits=True)
            used = b.used(engine.lay)
            assert not any(np.any(x[:, :, used:]) for x in b.keys + b.values)
            for x in b.keys + b.values:
                x[:, :, used:] = 1e3  # junk where nothing is in use
            lb = engine.feed(b, ids[j:j + 8], max_piece=piece, all_logits=True)
            np.testing.assert_array_equal(la, lb)
            used = b.used(engine.lay)
            for x in b.keys + b.values:
                x[:, :, used:] = 0.0


def test_the_graph_reads_only_the_rows_in_use(engine):
    _reads_only_rows_in_use(engine)


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(["fp32", "fp16", "int8"]),
       rows=st.integers(1, 6), cols=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(1e-3, 1e3))
def test_state_codec_round_trip_within_half_a_step(fmt, rows, cols, seed, scale):
    x = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)
    enc, maxerr = state_codec.encode(x, fmt)
    y = state_codec.decode(enc, fmt)
    err = np.abs(y - x)
    assert float(err.max()) == pytest.approx(maxerr, abs=1e-12)
    if fmt == "fp32":
        assert maxerr == 0.0
    elif fmt == "fp16":
        assert np.all(err <= np.abs(x) * 2.0**-11 + 2.0**-25)
    else:
        half_step = enc["scale"][:, None] / 2
        assert np.all(err <= half_step * (1 + 1e-5) + 1e-12)


def test_int8_codec_zero_rows_and_dtypes():
    enc, err = state_codec.encode(np.zeros((3, 4), np.float32), "int8")
    assert err == 0.0 and enc["q"].dtype == np.int8 and enc["scale"].dtype == np.float32
    assert state_codec.nbytes(enc) == 3 * 4 + 3 * 4


def test_sampling_modes():
    logits = np.array([0.0, 5.0, 1.0, 4.9])
    rng = np.random.default_rng(0)
    assert sample(logits, Sampling(temperature=0), rng) == 1
    picks = {sample(logits, Sampling(temperature=1.0, top_k=2, top_p=1.0), rng) for _ in range(200)}
    assert picks == {1, 3}
    picks = {sample(logits, Sampling(temperature=1.0, top_k=0, top_p=0.4), rng) for _ in range(200)}
    assert picks == {1}
    a = [sample(logits, Sampling(temperature=2.0, top_k=0, top_p=1.0, seed=9), np.random.default_rng(9)) for _ in range(3)]
    b = [sample(logits, Sampling(temperature=2.0, top_k=0, top_p=1.0, seed=9), np.random.default_rng(9)) for _ in range(3)]
    assert a == b
    with pytest.raises(ValueError):
        Sampling(temperature=-1).validate()


def test_the_paired_rotation_is_the_rotation():
    """The runtime rotates the sinks and rows before each decode step as x cos + rotate_half(x) sin, the second
    factor kept (ring.rotate_pair); it is RoPE's rotation (ring.rotate), with scaling divisors too."""
    from cortex_edge.runtime import ring

    x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
    for delta, div in ((0, ()), (7, ()), (1100, ()), (300, tuple(np.linspace(1, 8, 32)))):
        cos, sin = (a.astype(np.float32) for a in ring.rope_angles(delta, 64, 1e5, div))
        np.testing.assert_allclose(ring.rotate_pair(x, ring.rotate_half(x), cos, sin), ring.rotate(x, delta, 1e5, div),
                                   atol=2e-6)
