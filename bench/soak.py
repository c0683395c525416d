"""Soak the runtime: `python bench/soak.py [BUNDLE] [--tokens 1000000] [--json FILE]`.

Default bundle: the packaged builtin:tiny. Prints and writes: non-finite count, each CMS level's worst
norm as a fraction of its decay bound, RSS growth after warm-up, decode latency per window.
"""

from __future__ import annotations

import argparse
import json

from cortex_edge.runtime.bundle import load_bundle
from cortex_edge.runtime.engine import Engine
from cortex_edge.runtime.selftest import PACKAGED
from cortex_edge.runtime.soak import soak


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle", nargs="?", default=str(PACKAGED))
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    eng = Engine(load_bundle(a.bundle), threads=a.threads)
    rep = soak(eng, a.tokens, progress=lambda n: print(f"  {n:>9,} tokens", flush=True))
    rep["bundle"] = a.bundle
    print(f"{rep['tokens']:,} tokens, {rep['events']:,} memory events in {rep['seconds']:.0f} s")
    print(f"non-finite values: {rep['nonfinite']}")
    print("worst CMS norm / decay bound per level: " + ", ".join(f"{x:.3f}" for x in rep["norm_over_bound_worst"]))
    print(f"RSS after warm-up ({100 * rep['warmup_fraction']:.0f} % of the run) {rep['rss_warm'] / 2**20:.2f} MiB, "
          f"growth after it {100 * rep['rss_growth']:.2f} % (from the first sample: "
          f"{100 * rep['rss_growth_from_first_sample']:.2f} %)")
    print("decode p50 ms per window: " + ", ".join(f"{w['p50_ms']:.3f}" for w in rep["latency"]))
    print(f"last/first window p50: {rep['latency_last_over_first']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
