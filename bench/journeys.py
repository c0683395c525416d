"""Multi-turn memory journeys, the shape of the CLI test: a fact, four turns of Genesis passages, the question.

  python bench/journeys.py BUNDLE [--threads 2] [--max-piece N] [--json bench/results/journeys_smollm2.json]

Each of 8 journeys states one fact ("My cat is called Pixel.", the CLI test's own, then seven others), pastes
four passages of KJV Genesis as turns ("Here is a passage I am reading: … What do you think of it?"; about 1,600
tokens, so the fact has left the 1,024-token window), then asks for it; greedy with the CLI's repeat penalty
(1.1), 24 new tokens a turn, in-process through the chat code (bench/row_placement.py's journey). Counted when the answer holds the value whole.
--max-piece 1 feeds every prompt token by token (the same maths wherever chunk == token by token holds).
What this leaves out: sessions between turns (the CLI test itself), sampling.
"""

from __future__ import annotations

import argparse
import json

from row_placement import journey

from cortex_edge.runtime.bundle import load_bundle
from cortex_edge.runtime.engine import Engine

FACTS = [("My cat is called Pixel.", "What is my cat called?", "Pixel"),
         ("My dog is called Rufus.", "What is my dog called?", "Rufus"),
         ("My sister's name is Ingrid.", "What is my sister's name?", "Ingrid"),
         ("I live in Lisbon.", "Where do I live?", "Lisbon"),
         ("My favourite colour is teal.", "What is my favourite colour?", "teal"),
         ("My car is a blue Volvo.", "What car do I drive?", "Volvo"),
         ("My boss is called Harriet.", "What is my boss called?", "Harriet"),
         ("I was born in 1987.", "What year was I born?", "1987")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-piece", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    eng = Engine(load_bundle(a.bundle), threads=a.threads)
    if a.max_piece:
        feed = eng.feed
        eng.feed = lambda st, ids, max_piece=None, **kw: feed(st, ids, max_piece=a.max_piece, **kw)
    rows = []
    for v, (fact, question, value) in enumerate(FACTS):
        r = journey(eng, [fact], [(question, value)], 4, first_verse=5 * v, answer_tokens=24)[0]
        rows.append({"fact": fact, "tokens": r["tokens"], "answer": r["answer"], "correct": r["correct"]})
        print(f"{v}: {r['tokens']} tokens before the question, {'right' if r['correct'] else 'wrong'}: "
              f"{r['answer'][:60]!r}", flush=True)
    right = sum(r["correct"] for r in rows)
    print(f"{right} of {len(rows)} journeys recall their fact")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bundle": a.bundle, "right": right, "journeys": rows, "max_piece": a.max_piece,
                       "command": "python bench/journeys.py BUNDLE" + (f" --max-piece {a.max_piece}" if a.max_piece else "")},
                      f, indent=1)


if __name__ == "__main__":
    main()
