"""Where a decode step's milliseconds go: onnxruntime (by operator type), the Python around it, the jump map.

`cortex-edge bench BUNDLE --profile` runs a history of `context` random tokens, then `tokens` greedy decode
steps, and splits each step's wall time into

  onnxruntime    the graph's run (every matmul, the attention over the buffers, the memory read)
  plan           ring.plan_step (positions and the attention bias)
  jump map       Engine.memory_event (decode the stored state, step the CMS, encode it; every C tokens)
  sampling       argmax over the logits
  python rest    binding the inputs, the chunk starts' buffer moves, the write-feature sum

and, from onnxruntime's own profiler over the same steps in a second session, the graph's time per operator
type (MatMulNBits, MatMulInteger, Softmax, ...). NumPy + onnxruntime only; nothing here is asserted in tests.
What this leaves out: peers (bench/race.py), RSS and bandwidth (runtime/bench.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict

import numpy as np
import onnxruntime as ort

from cortex_edge import contract
from cortex_edge.runtime import ring
from cortex_edge.runtime.bundle import Bundle
from cortex_edge.runtime.engine import Engine, session_options

WARMUP = 2  # decode steps before the timed ones


class _Timed:
    """Wraps a callable and sums the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1


class _TimedSession:
    def __init__(self, sess):
        self.sess = sess
        self.run = self.run_with_iobinding = _Timed(sess.run_with_iobinding)

    def __getattr__(self, name):
        return getattr(self.sess, name)


def _history(engine: Engine, context: int, seed: int):
    rng = np.random.default_rng(seed)
    st = engine.new_state()
    for j in range(0, context, 1024):
        engine.feed(st, rng.integers(3, engine.cfg.vocab_size, min(1024, context - j)))
    return st, int(rng.integers(3, engine.cfg.vocab_size))


def split(engine: Engine, context: int, tokens: int, seed: int = 0) -> dict:
    """Per-step milliseconds by part, measured on `engine` (its own session) after `context` tokens."""
    st, tok = _history(engine, context, seed)
    for _ in range(WARMUP):  # not timed
        tok = int(np.argmax(engine.feed(st, [tok])))
    sess, event, plan = engine.sess, engine.memory_event, ring.plan_step
    engine.sess = _TimedSession(sess)
    engine.memory_event = _Timed(event)
    ring.plan_step = _Timed(plan)
    sample = _Timed(np.argmax)
    try:
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = int(sample(engine.feed(st, [tok])))
        total = time.perf_counter() - t0
        parts = {"onnxruntime": engine.sess.run.seconds, "plan": ring.plan_step.seconds,
                 "jump_map": engine.memory_event.seconds, "sampling": sample.seconds}
        events = engine.memory_event.calls
    finally:
        engine.sess, ring.plan_step = sess, plan
        del engine.memory_event  # back to the class's method
    parts["python_rest"] = total - sum(parts.values())
    ms = {k: 1e3 * v / tokens for k, v in parts.items()}
    return {"context": context, "tokens": tokens, "ms_per_token": 1e3 * total / tokens, "ms_by_part": ms,
            "share_by_part": {k: v / (1e3 * total / tokens) for k, v in ms.items()}, "memory_events": events}


def operators(bundle: Bundle, threads: int, context: int, tokens: int, seed: int = 0) -> dict:
    """onnxruntime's profiler over `tokens` decode steps: milliseconds per token by operator type (the operators
    inside the graph's branch that ran; the If around them is not counted twice)."""
    engine = Engine(bundle, threads=threads)
    st, tok = _history(engine, context, seed)
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(engine.threads)  # the runtime's own settings, plus the profiler
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        engine.sess = ort.InferenceSession(str(bundle.file(contract.GRAPH)), opts, providers=["CPUExecutionProvider"])
        engine._binding = None  # bound to the new session at the next step
        for _ in range(WARMUP + tokens):
            tok = int(np.argmax(engine.feed(st, [tok])))
        with open(engine.sess.end_profiling(), encoding="utf-8") as f:
            trace = json.load(f)
    runs = sorted(ev["ts"] for ev in trace if ev.get("name") == "model_run")
    start = runs[-tokens]  # the warm-up steps' kernels are not counted
    by_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    control = {"If", "Loop", "Scan"}  # their time is their branch's operators' time, counted on its own
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev["ts"] >= start:
            op = ev.get("args", {}).get("op_name", "?")
            if op in control:
                continue
            by_op[op] += ev["dur"] / 1e3  # µs -> ms
            nodes[op] += 1
    total = sum(by_op.values())
    rows = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {"context": context, "tokens": tokens, "kernel_ms_per_token": total / tokens,
            "by_operator": [{"op": op, "ms_per_token": ms / tokens, "share": ms / total if total else 0.0,
                             "nodes": nodes[op] // tokens} for op, ms in rows]}


def run(bundle: Bundle, threads: int | None, contexts: list[int], tokens: int) -> dict:
    engine = Engine(bundle, threads=threads)
    return {"bundle": str(bundle.path), "weights": bundle.weights, "state": bundle.state_format,
            "threads": engine.threads,
            "split": [split(engine, c, tokens) for c in contexts],
            "operators": [operators(bundle, engine.threads, c, tokens) for c in contexts]}


def render(report: dict) -> list[str]:
    lines = [f"{report['bundle']}: weights {report['weights']}, state {report['state']}, {report['threads']} threads"]
    for s, o in zip(report["split"], report["operators"]):
        parts = ", ".join(f"{k} {v:.2f} ms ({100 * s['share_by_part'][k]:.0f} %)" for k, v in s["ms_by_part"].items())
        lines.append(f"history {s['context']}: {s['ms_per_token']:.2f} ms/token = {parts}")
        top = ", ".join(f"{r['op']} {r['ms_per_token']:.2f} ms ({100 * r['share']:.0f} %)" for r in o["by_operator"][:8])
        lines.append(f"  kernels {o['kernel_ms_per_token']:.2f} ms/token: {top}")
    return lines
