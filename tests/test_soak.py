"""A short soak through the runtime (the 1M-token run is bench/soak.py; the slow marker runs 200k)."""

from __future__ import annotations

import numpy as np
import pytest

from cortex_edge.runtime.soak import soak
from tests.conftest import EMULATED

pytestmark = pytest.mark.aarch64


def _check(rep, tokens):
    assert rep["tokens"] >= tokens and rep["events"] >= tokens // 16
    assert rep["nonfinite"] == 0
    assert all(0 < r <= 1.0 for r in rep["norm_over_bound_worst"]), rep["norm_over_bound_worst"]
    assert np.isfinite(rep["rss_growth"])


def test_short_soak(engine):
    n = 2_000 if EMULATED else 20_000
    _check(soak(engine, n, decode_every=n // 4, decode_tokens=8), n)


@pytest.mark.slow
def test_long_soak_memory_flat(engine):
    rep = soak(engine, 200_000, decode_every=20_000, decode_tokens=16)
    _check(rep, 200_000)
    assert rep["rss_growth"] < 0.01, rep["rss_growth"]  # a leak of 1 % of the process in 200k tokens fails
