"""Drift of the stored CMS state (fp16, int8 per-slot scales) against fp32 over many memory events.

Runs the runtime's own jump map (runtime/cms.py) and codecs (quantize/state_codec.py) exactly as
Engine.memory_event does: decode the stored state, step in fp32, encode. The fp32 trajectory is the
reference; all three get the same event summaries. Reports, per level, the relative Frobenius error
of the memory and of reads through it (random queries), at the end and the worst along the way.

  python bench/state_drift.py [--events 10000] [--config tiny|default] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cortex_edge.config import CMSConfig, tiny_config
from cortex_edge.quantize import state_codec
from cortex_edge.runtime import cms


def store(levels, fmt):
    return [(state_codec.encode(lv.mem, fmt)[0], state_codec.encode(lv.keys, fmt)[0], lv.usage) for lv in levels]


def load(stored, fmt):
    return [cms.Level(state_codec.decode(m, fmt), state_codec.decode(k, fmt), u.copy()) for m, k, u in stored]


def run(cfg: CMSConfig, events: int, seed: int = 0) -> dict:
    w = cms.random_write_weights(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    qs = rng.standard_normal((32, cfg.key_dim)).astype(np.float32)
    fmts = ("fp32", "fp16", "int8")
    stored = {f: store(cms.empty_levels(cfg), f) for f in fmts}
    worst = {f: [0.0] * cfg.levels for f in fmts}
    worst_read = {f: [0.0] * cfg.levels for f in fmts}
    t0 = time.time()
    for e in range(1, events + 1):
        s = np.tanh(rng.standard_normal(cfg.event_dim)).astype(np.float32)
        for f in fmts:
            new, _ = cms.event_step(load(stored[f], f), s, e, w, cfg)
            stored[f] = store(new, f)
        if e % 10 == 0 or e == events:
            ref = load(stored["fp32"], "fp32")
            for f in fmts[1:]:
                got = load(stored[f], f)
                for lvl in range(cfg.levels):
                    rel = np.linalg.norm(got[lvl].mem - ref[lvl].mem) / max(np.linalg.norm(ref[lvl].mem), 1e-12)
                    worst[f][lvl] = max(worst[f][lvl], float(rel))
                    r_ref = np.stack([cms.read(ref[lvl].mem, ref[lvl].keys, q) for q in qs])
                    r_got = np.stack([cms.read(got[lvl].mem, got[lvl].keys, q) for q in qs])
                    rr = np.linalg.norm(r_got - r_ref) / max(np.linalg.norm(r_ref), 1e-12)
                    worst_read[f][lvl] = max(worst_read[f][lvl], float(rr))
    ref = load(stored["fp32"], "fp32")
    out = {"events": events, "seconds": round(time.time() - t0, 1), "config": {"slots": cfg.slots, "widths": cfg.widths,
           "decay": cfg.decay, "addressing": cfg.addressing, "delta_rule": cfg.delta_rule}, "formats": {}}
    for f in fmts[1:]:
        got = load(stored[f], f)
        out["formats"][f] = {
            "final_rel_err": [float(np.linalg.norm(g.mem - r.mem) / max(np.linalg.norm(r.mem), 1e-12))
                              for g, r in zip(got, ref)],
            "worst_rel_err": worst[f], "worst_read_rel_err": worst_read[f],
            "bytes_per_level": [state_codec.nbytes(m) + state_codec.nbytes(k) for m, k, _ in stored[f]],
        }
    out["formats"]["fp32"] = {"bytes_per_level": [state_codec.nbytes(m) + state_codec.nbytes(k)
                                                  for m, k, _ in stored["fp32"]]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--config", choices=["tiny", "default"], default="default")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cfg = tiny_config().cms if a.config == "tiny" else CMSConfig()
    rep = run(cfg, a.events)
    print(f"{a.events} events, CMS {list(zip(cfg.slots, cfg.widths))}, decay {cfg.decay}, {rep['seconds']} s")
    print(f"{'format':<6} {'level':>5} {'KiB':>8} {'final rel err':>14} {'worst rel err':>14} {'worst read err':>15}")
    for f in ("fp32", "fp16", "int8"):
        r = rep["formats"][f]
        for lvl in range(cfg.levels):
            kib = r["bytes_per_level"][lvl] / 1024
            if f == "fp32":
                print(f"{f:<6} {lvl:>5} {kib:>8.1f} {'(reference)':>14}")
            else:
                print(f"{f:<6} {lvl:>5} {kib:>8.1f} {r['final_rel_err'][lvl]:>14.2e} {r['worst_rel_err'][lvl]:>14.2e} "
                      f"{r['worst_read_rel_err'][lvl]:>15.2e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rep, fh, indent=1)


if __name__ == "__main__":
    main()
