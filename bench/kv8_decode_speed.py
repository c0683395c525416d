"""A whole decode step with the 8-bit KV cache, before building it: the bundle's decode graph against the same graph
with every GroupQueryAttention reading an int8 cache, on the same inputs. (The built one: `cortex-edge export …
--kv-cache int8`; bench/ab_bundles.py times it against the default bundle.)

  python bench/kv8_decode_speed.py BUNDLE [--context 4k] [--threads 2] [--rounds 30] [--steps 20]
                                   [--json bench/results/kv8_decode_speed.json]

The bundle's decode branch (quantize/branches.py) is taken as a graph of its own; a copy of it gets, on each
attention node, k_quant_type / v_quant_type PER_CHANNEL, kv_cache_bit_width 8 and static k_scale / v_scale
(bench/kv8_quality.py's per-channel calibration on Genesis tokens 0-2k), and int8 past/present buffers. A real
decode step's inputs are recorded from the runtime after `--context` tokens of Genesis (its buffers holding
that history: rows, sinks and the window); the int8 graph gets those buffers rounded to int8. Then the two graphs
run that step in turn, `--steps` times a round (each run writes its new row into the same place), and the
report is each round's median ms, their medians, and how close the int8 step's logits are to the fp32 one's.
What this leaves out: the runtime around the graph (NumPy would write int8 rows), the chunk branch, and whether
an int8 runtime keeps the memory's figures (bench/kv8_quality.py measures the rounding's quality).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv8_quality import calibrate, quantized  # noqa: E402
from quality import TEXT, log_softmax  # noqa: E402

from cortex_edge import contract  # noqa: E402


class Recorder:
    """Stands in for the onnxruntime session for one step: records what the engine binds, runs nothing."""

    def __init__(self):
        self.cpu, self.values = {}, {}

    def io_binding(self):
        return self

    def bind_cpu_input(self, name, x):
        self.cpu[name] = np.array(x)

    def bind_ortvalue_input(self, name, v):
        self.values[name] = v.numpy().copy()  # numpy() is a view of the engine's array, freed with its state

    def bind_ortvalue_output(self, name, v):
        pass

    def run_with_iobinding(self, b):
        pass


def int8_graph(decode, scales):
    """A copy of the decode graph whose attention keeps an int8 cache (scales: [(k_scale, v_scale)] a layer)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(decode)
    g = m.graph
    layer = {contract.past_key(i): i for i in range(len(scales))}
    n_gqa = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        i = layer[node.input[3]]
        ks, vs = (numpy_helper.from_array(np.asarray(s, np.float32).reshape(1, -1, 1, s.shape[-1]), f"kv8_{w}_scale_{i}")
                  for w, s in zip("kv", scales[i]))
        g.initializer.extend([ks, vs])
        ins = list(node.input) + [""] * (14 - len(node.input))
        ins[12], ins[13] = ks.name, vs.name
        node.input[:] = ins
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        n_gqa += 1
    if n_gqa != len(scales):
        raise SystemExit(f"expected {len(scales)} attention nodes, found {n_gqa}")
    buffers = {contract.past_key(i) for i in range(len(scales))} | {contract.past_value(i) for i in range(len(scales))}
    buffers |= {contract.present_key(i) for i in range(len(scales))} | {contract.present_value(i) for i in range(len(scales))}
    for v in list(g.input) + list(g.output):
        if v.name in buffers:
            v.type.tensor_type.elem_type = TensorProto.INT8
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="bench/results/kv8_decode_speed.json")
    a = ap.parse_args()
    import onnx
    import onnxruntime as ort

    from cortex_edge.quantize import branches
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.chat import Chat
    from cortex_edge.runtime.engine import Engine, session_options

    b = load_bundle(a.bundle)
    eng = Engine(b, threads=a.threads)
    ids = Chat(eng).plain.encode(TEXT.read_text(), add_special_tokens=False).ids
    scales = calibrate(eng, ids[:2048], "channel")
    st = eng.new_state()
    eng.feed(st, ids[:a.context])
    rec, sess = Recorder(), eng.sess
    eng.sess, eng._binding = rec, None
    with np.errstate(all="ignore"):  # the recorded step's outputs are never computed: the engine reads garbage
        eng.feed(st.copy(), ids[a.context:a.context + 1])  # one decode step, recorded
    eng.sess, eng._binding = sess, None

    decode = branches.split(onnx.load(str(b.file(contract.GRAPH))))[branches.DECODE]
    graphs = {"fp32 cache": decode, "int8 cache": int8_graph(decode, scales)}
    runs = {}
    for name, g in graphs.items():
        s = ort.InferenceSession(g.SerializeToString(), session_options(a.threads), providers=["CPUExecutionProvider"])
        bind = s.io_binding()
        for n, x in rec.cpu.items():
            bind.bind_cpu_input(n, x)
        held = []  # the buffers' OrtValues, kept alive with their arrays
        for i, (sk, sv) in enumerate(scales):
            for past, present, scale in ((contract.past_key(i), contract.present_key(i), sk),
                                         (contract.past_value(i), contract.present_value(i), sv)):
                x = quantized(rec.values[past], scale) if name == "int8 cache" else rec.values[past].copy()
                ov = ort.OrtValue.ortvalue_from_numpy(x)
                held.append((x, ov))
                bind.bind_ortvalue_input(past, ov)
                bind.bind_ortvalue_output(present, ov)
        logits = np.empty((1, 1, eng.cfg.vocab_size), np.float32)
        feat = np.empty((1, 1, eng.cfg.cms.event_dim), np.float32)
        bind.bind_ortvalue_output(contract.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        bind.bind_ortvalue_output(contract.WRITE_FEAT, ort.OrtValue.ortvalue_from_numpy(feat))
        s.run_with_iobinding(bind)
        runs[name] = {"session": s, "binding": bind, "held": held, "logits": logits.copy()}
    ms = {n: [] for n in runs}
    for r in range(a.rounds):
        for n in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            s, bind = runs[n]["session"], runs[n]["binding"]
            ts = []
            for _ in range(a.steps):
                t = time.perf_counter()
                s.run_with_iobinding(bind)
                ts.append(time.perf_counter() - t)
            ms[n].append(1e3 * statistics.median(ts))
    p, q = (log_softmax(runs[n]["logits"][0, 0]) for n in runs)
    rep = {"bundle": a.bundle, "context": a.context, "threads": a.threads, "rows_in_use": int(rec.cpu[contract.TOTAL_LEN]),
           "ms_per_round": ms, "ms_median": {n: statistics.median(v) for n, v in ms.items()},
           "int8_faster_rounds": sum(y < x for x, y in zip(*ms.values())), "rounds": a.rounds,
           "logits": {"same_top1": bool(p.argmax() == q.argmax()), "kl": float(np.sum(np.exp(p) * (p - q)))},
           "command": f"python bench/kv8_decode_speed.py BUNDLE --context {a.context} --threads {a.threads} "
                      f"--rounds {a.rounds} --steps {a.steps}"}
    print(json.dumps({k: v for k, v in rep.items() if k != "ms_per_round"}))
    with open(a.json, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
