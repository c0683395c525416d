"""One-row MatMulNBits throughput on SmolLM2's matrix shapes: bits x accuracy level x intra-op threads.

A decode step is one row (M = 1) through each weight matrix. This measures onnxruntime's kernel alone:
a graph of `reps` independent MatMulNBits nodes of one shape (random packed weights, ~40 MB in all, so
that the weights do not all sit in cache), run 30 times after 5 warm-ups; GB/s = weight bytes / time.
Whether a second thread helps a matrix this size is the question it answers (SmolLM2's per-layer
matrices are 0.2-2 MB: the thread pool's hand-off is of the order of the work).

  python bench/matmulnbits.py [--threads 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # qkv, o, gate+up, down, lm_head
KINDS = [(4, 4), (4, 1), (8, 4)]  # (bits, accuracy_level): 4 = int8 activations (what bundles use), 1 = fp32


def graph(K: int, N: int, bits: int, level: int, reps: int, block: int = 32) -> tuple[bytes, int]:
    nb, blob = K // block, block * bits // 8
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for r in range(reps):
        inits += [numpy_helper.from_array(rng.integers(0, 255, (N, nb, blob), dtype=np.uint8), f"B{r}"),
                  numpy_helper.from_array(rng.random(N * nb, dtype=np.float32) * 0.01, f"S{r}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{r}", f"S{r}"], [f"Y{r}"], domain="com.microsoft",
                                      K=K, N=N, bits=bits, block_size=block, accuracy_level=level))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info(f"Y{r}", TensorProto.FLOAT, [1, N]) for r in range(reps)], inits)
    m = helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString(), reps * N * nb * (blob + 4)


def measure(K: int, N: int, bits: int, level: int, threads: int, iters: int = 30) -> float:
    reps = max(2, min(16, int(40e6 / (K * N))))
    model, nbytes = graph(K, N, bits, level, reps)
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    s = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    feed = {"A": np.random.default_rng(1).random((1, K), dtype=np.float32)}
    for _ in range(5):
        s.run(None, feed)
    t = time.perf_counter()
    for _ in range(iters):
        s.run(None, feed)
    return nbytes / ((time.perf_counter() - t) / iters) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        for bits, level in KINDS:
            cells = []
            for K, N in SHAPES:
                gbps = measure(K, N, bits, level, threads)
                rows.append({"threads": threads, "bits": bits, "accuracy_level": level, "K": K, "N": N, "gb_per_s": round(gbps, 2)})
                cells.append(f"{K}x{N} {gbps:5.1f}")
            print(f"threads {threads}  {bits}-bit  level {level}  GB/s:  " + "   ".join(cells), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
