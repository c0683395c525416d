"""How often does the chat loop, with and without the repeat penalty? (the default of --repeat-penalty)

100 answers per setting (25 prompts x 4 seeds), the chat's own sampling (temperature 0.7, top-k 40,
top-p 0.95), up to 256 tokens each, through the runtime. An answer loops when a run of k tokens repeats
three times back to back (3k >= 12 tokens), or when a line of 10+ characters appears three times.

    python bench/repetition.py [BUNDLE] --json bench/results/repetition_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time

PROMPTS = [
    "Tell me about your favourite animal.", "Write a short poem about rain.", "Describe a busy market.",
    "What do you like about summer?", "Tell me a story about a lost dog.", "Explain how a bicycle works.",
    "What makes a good friend?", "Describe the sea at night.", "Write a letter to a neighbour.",
    "What is your advice for a first job?", "Tell me about the moon.", "Describe your ideal house.",
    "Why do people like music?", "Write a recipe for pancakes.", "Tell me about a famous painter.",
    "What should I pack for a hike?", "Describe a thunderstorm.", "Tell me a joke and explain it.",
    "What is the best way to learn a language?", "Write a diary entry for a cat.",
    "Describe a walk in the forest.", "What do trees need to grow?", "Tell me about trains.",
    "Write a short speech for a wedding.", "What is it like to live in a big city?",
]
SEEDS = (0, 1, 2, 3)


def loops(ids: list[int], text: str) -> bool:
    n = len(ids)
    for k in range(1, 41):
        if 3 * k < 12:
            continue
        for i in range(0, n - 3 * k + 1):
            if ids[i:i + k] == ids[i + k:i + 2 * k] == ids[i + 2 * k:i + 3 * k]:
                return True
    lines = [x.strip() for x in text.splitlines() if len(x.strip()) >= 10]
    return any(lines.count(x) >= 3 for x in set(lines))


def main():
    from cortex_edge.cli import _engine
    from cortex_edge.runtime.chat import Chat
    from cortex_edge.runtime.sampling import Sampling

    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?", default=None, help="default: the default model's bundle")
    ap.add_argument("--penalties", default="1.0,1.1")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    engine = _engine(args.bundle, args.threads)
    rep = {"bundle": str(engine.bundle.path), "answers_per_setting": len(PROMPTS) * len(SEEDS),
           "max_new_tokens": args.max_new_tokens, "settings": []}
    for pen in (float(x) for x in args.penalties.split(",")):
        t0, looped, lengths, examples = time.time(), 0, [], []
        for seed in SEEDS:
            for p in PROMPTS:
                c = Chat(engine)
                s = Sampling(temperature=0.7, top_k=40, top_p=0.95, seed=seed, repeat_penalty=pen)
                text = "".join(c.turn(p, s, args.max_new_tokens))
                ids = c.plain.encode(text, add_special_tokens=False).ids
                lengths.append(c.last.new_tokens)
                if loops(ids, text):
                    looped += 1
                    if len(examples) < 3:
                        examples.append({"prompt": p, "seed": seed, "answer": text[-300:]})
        row = {"repeat_penalty": pen, "looping_answers": looped, "mean_new_tokens": sum(lengths) / len(lengths),
               "seconds": round(time.time() - t0, 1), "examples": examples}
        rep["settings"].append(row)
        print(f"repeat penalty {pen}: {looped} of {rep['answers_per_setting']} answers loop; mean length "
              f"{row['mean_new_tokens']:.0f} tokens ({row['seconds']:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
