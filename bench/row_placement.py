"""Where should the row level's rows be read from? Placements compared on validation seeds, one bundle.

  python bench/row_placement.py BUNDLE --places slot,0,16,32 --json bench/results/row_placement_validation.json
  python bench/row_placement.py BUNDLE --places 16 --biases 0,1,2,3 --json bench/results/row_bias_validation.json

The rows' keys are rotated for the position they are read at (runtime/rows.py read_position): "slot" reads slot j
at distance R - j (LRU fills slots from 0, so a chat's first fact sits farthest, at 42-48); an integer g reads the
held rows in token order, the newest g + 1 positions back ("recency" with rows_gap = g). The gate and the stored
state are the same for every placement: only the read changes, so one bundle serves (its config is replaced
in-process). --biases adds a constant to every visible row's attention logit (config rows_bias: a row's weight
times e^bias), each placement crossed with each bias. --key-scales multiplies the rows' keys where they are read
(config rows_key_scale: a row's logit times the scale), and
--thresholds replaces the write gate's threshold tau (config rows_threshold), and
--genesis adds the perplexity of tokens 4k-8k of Genesis with the sidecar on (bench/memory_harm.py's no-harm
figure; sidecar off it is 8.523). Per placement:

  niah        pass keys at 2k tokens, 16 samples from held-out index 500 (the evaluation reports from 0)
  chat        `eval chat-memory` at 2k tokens of talk, sidecar on, 16 chats from index 500
  journey     the CLI test's chat in-process: "My cat is called Pixel.", four Genesis turns, the question
  three       three facts, five Genesis turns, one question for each (each from the same state)

Greedy; the journeys use the CLI's default repeat penalty (1.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from cortex_edge.runtime import chat_memory, niah
from cortex_edge.runtime import memory_tasks as mt
from cortex_edge.runtime.bundle import load_bundle
from cortex_edge.runtime.chat import Chat
from cortex_edge.runtime.engine import Engine
from cortex_edge.runtime.sampling import Sampling

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_harm import genesis  # noqa: E402

FIRST = 500  # validation samples: disjoint from the evaluation's 0..
ONE = (["My cat is called Pixel."], [("What is my cat called?", "Pixel")], 4)
THREE = (["My cat is called Pixel.", "My locker code is 4821.", "I grew up in Tallinn."],
         [("What is my cat called?", "Pixel"), ("What is my locker code?", "4821"),
          ("Which city did I grow up in?", "Tallinn")], 5)


def journey(engine: Engine, facts, questions, passages: int, first_verse: int = 0,
            answer_tokens: int = 12) -> list[dict]:
    """Facts told, `passages` turns pasting Genesis from verse first_verse on, then each question from the same
    state (greedy, the CLI's repeat penalty). Returns per question its answer, whether it holds the value whole, and
    the tokens before it."""
    c = Chat(engine)
    s = Sampling(temperature=0.0, seed=0, repeat_penalty=1.1)
    for f in facts:
        "".join(c.turn(f, s, max_new_tokens=24))
    verses = mt.genesis_verses()
    for i in range(passages):
        k = first_verse + 40 * i
        "".join(c.turn("Here is a passage I am reading: " + " ".join(verses[k:k + 12])
                       + " What do you think of it?", s, max_new_tokens=24))
    st, out = c.state, []
    for q, value in questions:
        c.state = st.copy()
        a = "".join(c.turn(q, s, max_new_tokens=answer_tokens))
        out.append({"question": q, "answer": a, "correct": mt.answer_contains(a, value), "tokens": st.n})
    return out


def _values(arg: str | None, current: float) -> list[float]:
    """A comma-separated sweep, or the bundle's own value when the flag is not given."""
    return [current] if arg is None else [float(v) for v in arg.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--places", default="slot,0,16,32", help="slot, or gaps for recency")
    # each sweep defaults to the bundle's own value
    ap.add_argument("--biases", default=None, help="row logit biases (config rows_bias)")
    ap.add_argument("--key-scales", default=None, help="factors on the rows' keys (config rows_key_scale)")
    ap.add_argument("--thresholds", default=None, help="write thresholds (config rows_threshold)")
    ap.add_argument("--genesis", action="store_true", help="also Genesis perplexity at tokens 4k-8k, sidecar on")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    engine = Engine(load_bundle(a.bundle), threads=a.threads)
    base = engine.cfg
    rows = []
    c = base.cms
    for name, bias, scale, tau in ((n, b, k, t) for n in a.places.split(",")
                                   for b in _values(a.biases, c.rows_bias)
                                   for k in _values(a.key_scales, c.rows_key_scale)
                                   for t in _values(a.thresholds, c.rows_threshold)):
        t0 = time.perf_counter()
        place, gap = ("slot", 0) if name == "slot" else ("recency", int(name))
        engine.cfg = dataclasses.replace(base, cms=dataclasses.replace(base.cms, rows_place=place, rows_gap=gap,
                                                                       rows_bias=bias, rows_key_scale=scale,
                                                                       rows_threshold=tau))
        nr = niah.run(engine, [2048], a.samples, memory_modes=(True,), first=FIRST)["rows"][0]
        cm = chat_memory.run(engine, [2048], a.samples, control=False, reference=False, first=FIRST)["rows"][0]
        row = {"place": place, "gap": gap, "bias": bias, "key_scale": scale, "threshold": tau,
               "niah_2k": nr["accuracy"], "chat_memory_2k": cm["accuracy"],
               "journey": journey(engine, *ONE), "three_facts": journey(engine, *THREE),
               "genesis_4k_8k": genesis(engine)[0]["4k-8k"] if a.genesis else None,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name:>5} bias {bias:g} key scale {scale:g} threshold {tau:g}: pass keys {row['niah_2k']:.3f}, "
              f"chat facts {row['chat_memory_2k']:.3f}, journey "
              f"{sum(x['correct'] for x in row['journey'])}/1, three facts "
              f"{sum(x['correct'] for x in row['three_facts'])}/3"
              + (f", Genesis 4k-8k {row['genesis_4k_8k']:.3f}" if a.genesis else ""), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            sweeps = "".join(f" --{flag} {v}" for flag, v in (("biases", a.biases), ("key-scales", a.key_scales),
                                                              ("thresholds", a.thresholds)) if v is not None)
            json.dump({"bundle": a.bundle, "samples": a.samples, "first": FIRST, "rows": rows,
                       "command": f"python bench/row_placement.py BUNDLE --places {a.places}{sweeps} "
                                  f"--samples {a.samples}" + (" --genesis" if a.genesis else "")},
                      f, indent=1)


if __name__ == "__main__":
    main()
