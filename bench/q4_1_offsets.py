"""The exact Q4_1 offsets: which operator form is cheapest around MatMulNBits?

A GGUF's Q4_1 matrix is w = d·q + m per block of 32. MatMulNBits computes x·d(q − 8) exactly; the rest, the
offsets x·(m + 8d), is the sum of x over each block times a (K/32 × N) fp32 matrix. The bundle writes that as
four operators after each MatMulNBits (quantize/weights.py encode_exact). Forms measured here, each on a chain of
`--layers` matrices of SmolLM2's o-projection shape (576 × 576, one row, as a decode step runs them), each
checked against NumPy's x·w before it is timed:

  none        MatMulNBits alone: not exact (the floor every exact form is measured against)
  reduce      Reshape, ReduceSum, MatMul, Add (the shipped form)
  pool        AveragePool (kernel and stride 32) for the block sums, MatMul by 32·offsets, Add
  indicator   MatMul by a 0/1 (K × K/32) block indicator for the block sums, MatMul, Add
  bias        Reshape, ReduceSum, MatMul, the offsets fed to MatMulNBits' own bias input (one row only)

  python bench/q4_1_offsets.py --threads 1 --json bench/results/q4_1_offsets.json

The forms run interleaved, `--rounds` times each, and the median per-step time is reported.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FORMS = ("none", "reduce", "pool", "indicator", "bias")
BS = 32


def weights(K: int, N: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = rng.integers(1, 16, (N, K), dtype=np.uint8)  # mean 8: the chain without offsets stays finite too
    # scaled so that a chain of them keeps the activations' size (w's std ~ 1/sqrt(K))
    d = ((rng.random((N, K // BS), dtype=np.float32) * 0.2 + 0.9) * 0.2 / np.sqrt(K)).astype(np.float32)
    m = (d * (-8 + 0.5 * rng.standard_normal((N, K // BS)))).astype(np.float32)
    return q, d, m


def dense(q, d, m) -> np.ndarray:
    N, K = q.shape
    return (q.reshape(N, K // BS, BS) * d[..., None] + m[..., None]).reshape(N, K).T.astype(np.float32)  # (K, N)


def build(form: str, layers: int, K: int, seed: int = 0) -> tuple[bytes, list[np.ndarray]]:
    """A chain y_{i+1} = y_i · w_i, x of shape (1, 1, K); returns the model and its matrices' (q, d, m)."""
    rng = np.random.default_rng(seed)
    nb = K // BS
    nodes, inits, mats = [], [], []
    c = lambda a, n: inits.append(numpy_helper.from_array(np.asarray(a), n)) or n  # noqa: E731
    if form in ("reduce", "bias"):
        c(np.array([1, 1, nb, BS], np.int64), "blocks")
        c(np.array([-1], np.int64), "last")
    if form == "bias":
        c(np.array([K], np.int64), "flat")
    if form == "indicator":
        ind = np.zeros((K, nb), np.float32)
        ind[np.arange(K), np.arange(K) // BS] = 1.0
        c(ind, "indicator")
    x = "x"
    for i in range(layers):
        q, d, m = weights(K, K, rng)
        mats.append((q, d, m))
        qb = q.reshape(K, nb, BS // 2, 2)
        c(np.ascontiguousarray(qb[..., 0] | (qb[..., 1] << 4)), f"q{i}")
        c(d.reshape(-1), f"d{i}")
        off = (m + 8 * d).T.astype(np.float32)  # (nb, N)
        y = f"y{i}"
        if form == "bias":
            nodes += [helper.make_node("Reshape", [x, "blocks"], [f"xb{i}"]),
                      helper.make_node("ReduceSum", [f"xb{i}", "last"], [f"xs{i}"], keepdims=0),
                      helper.make_node("MatMul", [f"xs{i}", c(off, f"o{i}")], [f"c{i}"]),
                      helper.make_node("Reshape", [f"c{i}", "flat"], [f"cf{i}"])]
            # the bias input is MatMulNBits' sixth (A, B, scales, zero_points, g_idx, bias)
            nodes.append(helper.make_node("MatMulNBits", [x, f"q{i}", f"d{i}", "", "", f"cf{i}"], [y],
                                          domain="com.microsoft", K=K, N=K, bits=4, block_size=BS, accuracy_level=4))
            x = y
            continue
        main = y if form == "none" else f"mm{i}"
        nodes.append(helper.make_node("MatMulNBits", [x, f"q{i}", f"d{i}"], [main], domain="com.microsoft",
                                      K=K, N=K, bits=4, block_size=BS, accuracy_level=4))
        if form == "reduce":
            nodes += [helper.make_node("Reshape", [x, "blocks"], [f"xb{i}"]),
                      helper.make_node("ReduceSum", [f"xb{i}", "last"], [f"xs{i}"], keepdims=0),
                      helper.make_node("MatMul", [f"xs{i}", c(off, f"o{i}")], [f"c{i}"]),
                      helper.make_node("Add", [main, f"c{i}"], [y])]
        elif form == "pool":
            nodes += [helper.make_node("AveragePool", [x], [f"xs{i}"], kernel_shape=[BS], strides=[BS]),
                      helper.make_node("MatMul", [f"xs{i}", c(off * BS, f"o{i}")], [f"c{i}"]),
                      helper.make_node("Add", [main, f"c{i}"], [y])]
        elif form == "indicator":
            nodes += [helper.make_node("MatMul", [x, "indicator"], [f"xs{i}"]),
                      helper.make_node("MatMul", [f"xs{i}", c(off, f"o{i}")], [f"c{i}"]),
                      helper.make_node("Add", [main, f"c{i}"], [y])]
        x = y
    g = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, K])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                           helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString(), mats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=120, help="matrices in the chain (a SmolLM2 step has 120 + head)")
    ap.add_argument("--K", type=int, default=576)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess, checks = {}, {}
    x = (np.random.default_rng(1).standard_normal((1, 1, a.K)) * 0.05).astype(np.float32)
    for f in FORMS:
        model, _ = build(f, a.layers, a.K)
        sess[f] = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        assert np.all(np.isfinite(sess[f].run(None, {"x": x})[0])), f
        # two matrices chained, against the dense reference (int8 activations: a relative error of a few 1e-3)
        short, mats = build(f, 2, a.K)
        o2 = ort.InferenceSession(short, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].reshape(-1)
        ref = x.reshape(-1) @ dense(*mats[0]) @ dense(*mats[1])
        checks[f] = float(np.linalg.norm(o2 - ref) / np.linalg.norm(ref))
    times = {f: [] for f in FORMS}
    for _ in range(a.rounds):
        for f in FORMS:
            for _ in range(5):
                sess[f].run(None, {"x": x})
            t0 = time.perf_counter()
            for _ in range(a.iters):
                sess[f].run(None, {"x": x})
            times[f].append((time.perf_counter() - t0) / a.iters * 1e3)
    med = {f: round(float(np.median(times[f])), 3) for f in FORMS}
    rows = [{"form": f, "ms_per_step": med[f], "rel_error_2_matrices": checks[f],
             "us_over_none_per_matrix": round((med[f] - med["none"]) * 1e3 / a.layers, 2)} for f in FORMS]
    for r in rows:
        print(f"{r['form']:>10}: {r['ms_per_step']:.3f} ms a chain of {a.layers}, "
              f"{r['us_over_none_per_matrix']:+.2f} µs a matrix over MatMulNBits alone, "
              f"relative error {r['rel_error_2_matrices']:.1e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"layers": a.layers, "K": a.K, "threads": a.threads, "rounds": a.rounds, "iters": a.iters,
                       "onnxruntime": ort.__version__, "rows": rows,
                       "command": f"python bench/q4_1_offsets.py --threads {a.threads} --layers {a.layers}"}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
