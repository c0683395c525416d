"""`cortex-edge eval chat-memory BUNDLE`: does the chat remember what it was told, beyond its window?

Synthetic multi-turn chats (runtime/memory_tasks.py, held-out seeds) through the chat code and the bundle's
own template: k facts stated in the first user turns, other conversation until about L tokens have passed,
then one question per fact (each a new turn, greedy). A fact counts when its value is in the answer.

  in-window   the same facts asked after a short exchange (the whole chat inside the window): the
              model's own ability, the reference every other figure is compared with
  memory      L tokens of conversation, sidecar on
  off         the same conversations, sidecar off (the control: what the window alone gives)

Other talk is small talk and trivia (memory_tasks.EVAL_TALK says why not scripture). Variants: the training
wordings (`seen`), the held-out wordings (`held-out wording`: each kind's
statement and question form never trained on) and the held-out kind of talk (`held-out talk`: recipes).
What this leaves out: training (cortex_edge/model/rows_train.py).
"""

from __future__ import annotations

import time

from cortex_edge.runtime import memory_tasks as mt
from cortex_edge.runtime.chat import Chat
from cortex_edge.runtime.engine import Engine
from cortex_edge.runtime.niah import wilson
from cortex_edge.runtime.sampling import Sampling

VARIANTS = {"seen": {"talk": mt.EVAL_TALK}, "held-out wording": {"held_out": True, "talk": mt.EVAL_TALK},
            "held-out talk": {"talk": mt.HELD_OUT_TALK}}
IN_WINDOW_TALK = 150  # tokens of other talk for the in-window reference


def one(engine: Engine, seed: int, facts: int, talk_tokens: int, memory: bool, variant: str,
        max_new: int = 24) -> dict:
    chat = Chat(engine, memory=memory)
    opts = VARIANTS[variant]

    def count(s):
        return len(chat.plain.encode(s, add_special_tokens=False).ids)

    conv = mt.conversation(seed, facts, talk_tokens, count, held_out=opts.get("held_out", False),
                           talk=opts.get("talk"))
    greedy = Sampling(temperature=0.0, seed=0)
    out = []
    for i, f in enumerate(conv.facts):
        text = "".join(chat.turn(f.question, greedy, max_new_tokens=max_new,
                                 history=conv.messages if i == 0 else None))
        out.append({"kind": f.kind, "value": f.value, "question": f.question, "answer": text,
                    "correct": mt.answer_contains(text, f.value)})
        if i == 0:
            history = chat.state.n
    return {"seed": seed, "tokens_before_questions": history, "facts": out}


def run(engine: Engine, lengths: list[int], samples: int, facts: int = 1, variants=("seen",), control: bool = True,
        reference: bool = True, first: int = 0, progress=None) -> dict:
    rows = []
    plans = []
    for v in variants:
        if reference:
            plans.append(("in-window", IN_WINDOW_TALK, True, v))
        for L in lengths:
            plans.append(("memory", L, True, v))
            if control:
                plans.append(("off", L, False, v))
    for what, L, mem, v in plans:
        t0 = time.perf_counter()
        cases = [one(engine, mt.HELD_OUT_SEED + 7919 * L + i, facts, L, mem, v)
                 for i in range(first, first + samples) if not progress or progress(1) is None]
        hits = sum(c["correct"] for s in cases for c in s["facts"])
        n = sum(len(s["facts"]) for s in cases)
        lo, hi = wilson(hits, n)
        rows.append({"condition": what, "variant": v, "talk_tokens": L, "memory": mem, "samples": samples,
                     "facts": n, "accuracy": hits / n, "ci95": [lo, hi],
                     "mean_tokens_before_questions": sum(s["tokens_before_questions"] for s in cases) / samples,
                     "seconds": round(time.perf_counter() - t0, 1), "cases": cases})
    for r in rows:  # each figure against the in-window reference of its variant
        ref = next((x for x in rows if x["condition"] == "in-window" and x["variant"] == r["variant"]), None)
        if ref and ref["accuracy"] > 0:
            r["share_of_in_window"] = r["accuracy"] / ref["accuracy"]
    return {"bundle": str(engine.bundle.path), "weights": engine.bundle.weights, "state": engine.state_format,
            "kv_cache": engine.bundle.kv_cache,
            "window": engine.cfg.window, "sinks": engine.cfg.sinks, "facts_per_chat": facts,
            "held_out_seed": mt.HELD_OUT_SEED, "first": first, "rows": rows}
