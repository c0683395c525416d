"""Two bundles' decode steps, alternating in one process: is one graph faster than another on a noisy machine?

  python bench/ab_bundles.py A B [--context 512,4k] [--rounds 12] [--tokens 32] [--threads 2] [--prefill N]
                             [--json bench/results/ab_bundles.json]

Both bundles are loaded side by side and fed the same random history; then, round after round, each decodes
`--tokens` greedy tokens from a copy of its state (A first in odd rounds, B first in even ones). The machine's
slow minutes hit both: the report is each round's median ms/token, their medians, and the share of rounds B
won. Also the two bundles' greedy tokens over the first round (do the graphs compute the same thing?).
--prefill N: also, round after round, each feeds the same N random tokens into a fresh state (tokens/s).
What this leaves out: RSS and peers (`cortex-edge bench`, bench/race.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from cortex_edge.cli import _contexts
from cortex_edge.runtime.bench import tokens_label
from cortex_edge.runtime.bundle import load_bundle
from cortex_edge.runtime.engine import Engine


def decode(engine: Engine, st, tok: int, n: int) -> tuple[float, list[int]]:
    """Median ms of n greedy decode steps from a copy of st, and the tokens."""
    s = st.copy()
    ts, out = [], []
    for _ in range(n):
        t = time.perf_counter()
        tok = int(np.argmax(engine.feed(s, [tok])))
        ts.append(time.perf_counter() - t)
        out.append(tok)
    return 1e3 * statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--context", default="512,4k")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=0, help="also time feeding this many tokens, alternating")
    ap.add_argument("--json", default="bench/results/ab_bundles.json")
    a = ap.parse_args()
    engines = {k: Engine(load_bundle(p), threads=a.threads) for k, p in (("A", a.a), ("B", a.b))}
    rows = []
    if a.prefill:
        ids = np.random.default_rng(1).integers(3, engines["A"].cfg.vocab_size, a.prefill)
        tps = {"A": [], "B": []}
        for r in range(a.rounds):
            for k in ("AB" if r % 2 == 0 else "BA"):
                t = time.perf_counter()
                engines[k].feed(engines[k].new_state(), ids)
                tps[k].append(a.prefill / (time.perf_counter() - t))
        row = {"prefill_tokens": a.prefill, "a_tok_s_per_round": tps["A"], "b_tok_s_per_round": tps["B"],
               "a_tok_s_median": statistics.median(tps["A"]), "b_tok_s_median": statistics.median(tps["B"]),
               "b_won_rounds": sum(y > x for x, y in zip(tps["A"], tps["B"])), "rounds": a.rounds}
        rows.append(row)
        print(f"prefill {a.prefill}: A {row['a_tok_s_median']:.0f}, B {row['b_tok_s_median']:.0f} tok/s (medians of "
              f"{a.rounds} rounds; B faster in {row['b_won_rounds']})", flush=True)
    for ctx in _contexts(a.context):
        rng = np.random.default_rng(0)
        hist = rng.integers(3, engines["A"].cfg.vocab_size, ctx)
        states = {}
        for k, e in engines.items():
            states[k] = e.new_state()
            if ctx:
                e.feed(states[k], hist)
        start = int(rng.integers(3, engines["A"].cfg.vocab_size))
        for k, e in engines.items():  # warm-up
            decode(e, states[k], start, 4)
        ms = {"A": [], "B": []}
        toks = {}
        for r in range(a.rounds):
            for k in ("AB" if r % 2 == 0 else "BA"):
                m, t = decode(engines[k], states[k], start, a.tokens)
                ms[k].append(m)
                toks.setdefault(k, t)
        same = sum(x == y for x, y in zip(toks["A"], toks["B"]))
        row = {"context": ctx, "a_ms_per_round": ms["A"], "b_ms_per_round": ms["B"],
               "a_ms_median": statistics.median(ms["A"]), "b_ms_median": statistics.median(ms["B"]),
               "b_won_rounds": sum(y < x for x, y in zip(ms["A"], ms["B"])), "rounds": a.rounds,
               "greedy_tokens_equal": f"{same}/{len(toks['A'])}"}
        rows.append(row)
        print(f"{tokens_label(ctx)}: A {row['a_ms_median']:.2f} ms, B {row['b_ms_median']:.2f} ms a token "
              f"(medians of {a.rounds} rounds; B faster in {row['b_won_rounds']}); greedy tokens equal {same}/{a.tokens}",
              flush=True)
    rep = {"a": a.a, "b": a.b, "threads": a.threads, "tokens_per_round": a.tokens, "rows": rows,
           "command": f"python bench/ab_bundles.py A B --context {a.context} --rounds {a.rounds} --tokens {a.tokens} "
                      f"--threads {a.threads}" + (f" --prefill {a.prefill}" if a.prefill else "")}
    with open(a.json, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
