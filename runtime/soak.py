"""Soak: stream many tokens through the runtime and watch for anything that grows or breaks.

Checks, the whole way: no NaN/Inf in logits or state, every CMS level's norm under its decay bound
max(||M_0||, V_max / d) (M_0 = 0), RSS (growth after a warm-up), and per-token decode
latency in windows (flat = last window's median close to the first's). NumPy + onnxruntime only.
"""

from __future__ import annotations

import time

import numpy as np
import psutil

from cortex_edge.runtime import cms
from cortex_edge.runtime.engine import Engine


def soak(engine: Engine, tokens: int, decode_every: int = 50_000, decode_tokens: int = 64, seed: int = 0,
         warmup: float = 0.2, progress=None) -> dict:
    """RSS growth is measured from the first sample after `warmup` of the run (allocator arenas settle
    in the first ~150k tokens here); the growth from the very first sample is reported beside it."""
    cfg = engine.cfg
    rng = np.random.default_rng(seed)
    vmax = cms.value_bound(engine.write_w, cfg.cms)
    d = [cfg.cms.decay_min if cfg.cms.adaptive_decay else x for x in cfg.cms.decay]
    bounds = [v / dd for v, dd in zip(vmax, d)]
    proc = psutil.Process()
    st = engine.new_state()
    C = cfg.cms.chunk
    worst_ratio = [0.0] * cfg.cms.levels
    rss, lat_windows, bad = [], [], 0
    rss_warm = None
    fed = 0
    t0 = time.perf_counter()
    while fed < tokens:
        n = min(C - st.n % C, tokens - fed)  # one piece = up to one memory event
        logits = engine.feed(st, rng.integers(3, cfg.vocab_size, n))
        fed += n
        bad += int(not np.isfinite(logits).all())
        for lvl, (m, k) in enumerate(st.views):
            nm = float(np.linalg.norm(m))
            bad += int(not np.isfinite(nm) or not np.isfinite(k).all())
            worst_ratio[lvl] = max(worst_ratio[lvl], nm / bounds[lvl])
        if fed % decode_every < n or fed == tokens:
            lat = []
            tok = int(np.argmax(logits))
            for _ in range(decode_tokens):
                t = time.perf_counter()
                tok = int(np.argmax(engine.feed(st, [tok])))
                lat.append(time.perf_counter() - t)
            fed += decode_tokens
            lat_windows.append({"at": fed, "p50_ms": float(np.median(lat) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3)})
            r = proc.memory_info().rss
            rss.append({"at": fed, "rss": r})
            if rss_warm is None and fed >= warmup * tokens:
                rss_warm = r
            if progress:
                progress(fed)
    growth = (max(x["rss"] for x in rss if x["at"] >= warmup * tokens) - rss_warm) / rss_warm
    growth_all = (max(x["rss"] for x in rss) - rss[0]["rss"]) / rss[0]["rss"]
    p50 = [w["p50_ms"] for w in lat_windows]
    return {"tokens": fed, "events": st.events, "seconds": time.perf_counter() - t0, "nonfinite": bad,
            "norm_over_bound_worst": worst_ratio, "bounds": bounds, "rss_warm": rss_warm,
            "rss_growth": growth, "rss_growth_from_first_sample": growth_all, "warmup_fraction": warmup, "rss": rss, "latency": lat_windows,
            "latency_last_over_first": p50[-1] / p50[0] if p50 and p50[0] > 0 else None}
