"""One layer's attention as onnxruntime's GroupQueryAttention: can it hold this project's attention state?

  python bench/gqa_attention.py --json bench/results/gqa_attention.json

A single-operator graph at SmolLM2's shape (9 query heads, 3 KV heads, head size 64) over one cache buffer laid
out [S sinks | R memory rows | a linear region of up to 2W tokens], past and present bound (IO binding) to the
same OrtValue so that new keys/values are written in place; rotary inside (do_rotary, position_ids), the row and
window masks as attention_bias. The sinks and rows are written into the buffer already rotated at whatever
position the caller chooses, which is what lets them sit at a fixed distance from the query. Checked against a
NumPy reference for decode and chunks (1, 5, 64 tokens), causal=1 and causal=0 (the chunk's causality then from
the bias), then timed: median microseconds of a decode call with S + R + W rows in use.
Also timed in fp16 (buffers and kernel), the KV cache a fp16 store would run, and (`cycled`) a decode step's 30
layers in turn, each over a buffer of its own (as a step reads them: out of cache), fp32 against the kernel's 8-bit
cache (kv_cache_bit_width 8, static per-channel k_scale / v_scale) at 564, 1,076 and 1,390 rows in use; and
(`int8_check`) what that 8-bit cache computes, checked against NumPy for decode steps and chunks.
What this leaves out: the rest of the layer (the exported graph: runtime/ring.py, cortex_edge/model/lm.py).
"""

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h

NH, KVH, HD = 9, 3, 64
S, R, W = 4, 48, 1024
CAP = S + R + 2 * W
THETA = 100000.0
MAXP = CAP + 64
DECODE_CAP = 1396  # buffer rows of the decode graphs: about the default bundle's (Layout.capacity: 1,394); the
# rows in use timed here (at most 1,390) stay below both


def rope_tables(n):
    inv = 1.0 / THETA ** (np.arange(0, HD, 2) / HD)
    ang = np.arange(n)[:, None] * inv[None]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rot(x, pos):  # x (..., T, HD), pos (T,)
    c, s = rope_tables(MAXP)
    c = np.concatenate([c[pos], c[pos]], -1)
    s = np.concatenate([s[pos], s[pos]], -1)
    hh = HD // 2
    return x * c + np.concatenate([-x[..., hh:], x[..., :hh]], -1) * s


def build(causal, dt=TP.FLOAT):
    g = h.make_graph(
        [
            h.make_node(
                "GroupQueryAttention",
                ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "cos", "sin", "pos", "bias"],
                ["out", "ck", "cv"],
                domain="com.microsoft",
                num_heads=NH,
                kv_num_heads=KVH,
                do_rotary=1,
                causal=causal,
            )
        ],
        "g",
        [
            h.make_tensor_value_info("q", dt, [1, "T", NH * HD]),
            h.make_tensor_value_info("k", dt, [1, "T", KVH * HD]),
            h.make_tensor_value_info("v", dt, [1, "T", KVH * HD]),
            h.make_tensor_value_info("pk", dt, [1, KVH, CAP, HD]),
            h.make_tensor_value_info("pv", dt, [1, KVH, CAP, HD]),
            h.make_tensor_value_info("seqlens_k", TP.INT32, [1]),
            h.make_tensor_value_info("total", TP.INT32, []),
            h.make_tensor_value_info("cos", dt, [MAXP, HD // 2]),
            h.make_tensor_value_info("sin", dt, [MAXP, HD // 2]),
            h.make_tensor_value_info("pos", TP.INT64, [1, "T"]),
            h.make_tensor_value_info("bias", dt, [1, 1, "T", "L"]),
        ],
        [
            h.make_tensor_value_info("out", dt, [1, "T", NH * HD]),
            h.make_tensor_value_info("ck", dt, [1, KVH, CAP, HD]),
            h.make_tensor_value_info("cv", dt, [1, KVH, CAP, HD]),
        ],
    )
    m = h.make_model(
        g, ir_version=10, opset_imports=[h.make_opsetid("", 20), h.make_opsetid("com.microsoft", 1)]
    )
    return m.SerializeToString()


def reference(q, kbuf, vbuf, n_used, pos, bias):
    # q (T, NH, HD) unrotated; kbuf (KVH, n_used, HD) already rotated; bias (T, n_used)
    qr = rot(q.transpose(1, 0, 2), pos)  # (NH, T, HD)
    kk = np.repeat(kbuf, NH // KVH, 0)
    vv = np.repeat(vbuf, NH // KVH, 0)
    sc = qr @ kk.transpose(0, 2, 1) / np.sqrt(HD) + bias[None]
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vv).transpose(1, 0, 2).reshape(q.shape[0], NH * HD)


def session(graph: bytes, threads: int) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    return ort.InferenceSession(graph, o, providers=["CPUExecutionProvider"])


def bind_in_place(sess, kv, vv, feeds: dict):
    """An IO binding of `feeds` with past and present bound to the same OrtValues (kv, vv): new rows in place."""
    b = sess.io_binding()
    for n, a in feeds.items():
        b.bind_cpu_input(n, a)
    b.bind_ortvalue_input("pk", kv)
    b.bind_ortvalue_input("pv", vv)
    b.bind_ortvalue_output("ck", kv)
    b.bind_ortvalue_output("cv", vv)
    b.bind_output("out")
    return b


def bind(sess, kv, vv, q, k, v, total, cos, sin, pos, bias):
    """IO binding with past and present on the same OrtValues (kv, vv): GQA then writes new rows in place."""
    return bind_in_place(sess, kv, vv, {"q": q, "k": k, "v": v, "seqlens_k": np.array([total - 1], np.int32),
                                        "total": np.array(total, np.int32), "cos": cos, "sin": sin, "pos": pos,
                                        "bias": bias})


def run(causal, threads=2, dt=np.float32):
    """dt float16: the buffers, inputs and kernel in fp16 (what a KV cache in fp16 would run)."""
    sess = session(build(causal, TP.FLOAT16 if dt == np.float16 else TP.FLOAT), threads)
    rng = np.random.default_rng(0)
    cos, sin = (x.astype(dt) for x in rope_tables(MAXP))
    kbuf = np.zeros((1, KVH, CAP, HD), dt)
    vbuf = np.zeros_like(kbuf)
    used = S + R + 300  # rows in use: sinks, rows, 300 linear tokens
    kbuf[0, :, :used] = rng.standard_normal((KVH, used, HD))
    vbuf[0, :, :used] = rng.standard_normal((KVH, used, HD))
    kv = ort.OrtValue.ortvalue_from_numpy(kbuf)
    vv = ort.OrtValue.ortvalue_from_numpy(vbuf)
    errs = []
    for T in (1, 1, 5, 1, 64):
        q = rng.standard_normal((1, T, NH * HD)).astype(dt)
        k = rng.standard_normal((1, T, KVH * HD)).astype(dt)
        v = rng.standard_normal((1, T, KVH * HD)).astype(dt)
        pos = np.arange(used, used + T)[None].astype(np.int64)
        total = used + T
        bias = np.zeros((1, 1, T, total), dt)
        neg = -1e9 if dt == np.float32 else -6e4  # fp16 tops out at 65504
        bias[0, 0, :, S + 3] = neg  # a masked row
        bias[0, 0, :, S + R : S + R + 10] = neg  # linear tokens out of the window
        for t in range(T):
            bias[0, 0, t, used + t + 1 :] = neg  # causal within the chunk
        kref = kv.numpy()[0, :, :used].astype(np.float32)
        vref = vv.numpy()[0, :, :used].astype(np.float32)
        knew = rot(k.astype(np.float32).reshape(T, KVH, HD).transpose(1, 0, 2), pos[0])
        vnew = v.astype(np.float32).reshape(T, KVH, HD).transpose(1, 0, 2)
        ref = reference(
            q.astype(np.float32).reshape(T, NH, HD),
            np.concatenate([kref, knew], 1),
            np.concatenate([vref, vnew], 1),
            total,
            pos[0],
            bias[0, 0].astype(np.float32),
        )
        b = bind(sess, kv, vv, q, k, v, total, cos, sin, pos, bias)
        sess.run_with_iobinding(b)
        out = b.copy_outputs_to_cpu()[2][0]
        errs.append(
            (T, float(np.abs(out - ref).max()), float(np.abs(kv.numpy()[0, :, used:total] - knew).max()))
        )
        used = total
    print("causal", causal, "errors (T, out, new keys in place):", errs)
    # timing: decode at ~S+R+W used
    used = S + R + W
    q = rng.standard_normal((1, 1, NH * HD)).astype(dt)
    k = rng.standard_normal((1, 1, KVH * HD)).astype(dt)
    bias = np.zeros((1, 1, 1, used + 1), dt)
    b = bind(sess, kv, vv, q, k, k, used + 1, cos, sin, np.array([[used]], np.int64), bias)
    for _ in range(20):
        sess.run_with_iobinding(b)
    ts = []
    for _ in range(300):
        t0 = time.perf_counter()
        sess.run_with_iobinding(b)
        ts.append(time.perf_counter() - t0)
    us = float(1e6 * np.median(ts))
    print(f"{np.dtype(dt).name}: decode over {used} rows, {threads} threads: p50 {us:.1f} us")
    return {
        "dtype": np.dtype(dt).name,
        "causal": causal,
        "threads": threads,
        "rows_in_use": used,
        "decode_us_p50": us,
        "max_error": max(e[1] for e in errs),
        "max_error_new_keys": max(e[2] for e in errs),
        "steps": [{"tokens": e[0], "max_error": e[1]} for e in errs],
    }


def build_decode(int8: bool, cap: int = DECODE_CAP) -> bytes:
    """A graph of packed q/k/v (T tokens) over a buffer of `cap` rows, its cache fp32 or int8."""
    dt = TP.INT8 if int8 else TP.FLOAT
    ins = ["qkv", "", "", "pk", "pv", "seqlens_k", "total", "cos", "sin", "pos", "bias"]
    attrs = dict(num_heads=NH, kv_num_heads=KVH, do_rotary=1, causal=1)
    extra = []
    if int8:
        ins += ["", "ks", "vs"]
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        extra = [h.make_tensor_value_info(n, TP.FLOAT, [1, KVH, 1, HD]) for n in ("ks", "vs")]
    g = h.make_graph(
        [h.make_node("GroupQueryAttention", ins, ["out", "ck", "cv"], domain="com.microsoft", **attrs)], "g",
        [h.make_tensor_value_info("qkv", TP.FLOAT, [1, "T", (NH + 2 * KVH) * HD]),
         h.make_tensor_value_info("pk", dt, [1, KVH, cap, HD]), h.make_tensor_value_info("pv", dt, [1, KVH, cap, HD]),
         h.make_tensor_value_info("seqlens_k", TP.INT32, [1]), h.make_tensor_value_info("total", TP.INT32, []),
         h.make_tensor_value_info("cos", TP.FLOAT, [cap + 64, HD // 2]),
         h.make_tensor_value_info("sin", TP.FLOAT, [cap + 64, HD // 2]),
         h.make_tensor_value_info("pos", TP.INT64, [1, "T"]), h.make_tensor_value_info("bias", TP.FLOAT, [1, 1, "T", "L"])]
        + extra,
        [h.make_tensor_value_info("out", TP.FLOAT, [1, "T", NH * HD]), h.make_tensor_value_info("ck", dt, [1, KVH, cap, HD]),
         h.make_tensor_value_info("cv", dt, [1, KVH, cap, HD])])
    m = h.make_model(g, ir_version=10, opset_imports=[h.make_opsetid("", 20), h.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString()


def int8_check(threads: int) -> dict:
    """What the 8-bit cache computes, against NumPy: the new keys rotated, then stored as clip(rint(k / k_scale))
    in place (past and present one OrtValue), values likewise, and the attention read over scale × q, the
    token's own rounded row included; decode steps and chunks (1, 1, 5, 1, 16 tokens). Returns the largest
    errors: the output against that reference and against one reading its own row unrounded, and the stored
    rows against the rounding (in int8 steps)."""
    sess = session(build_decode(True, cap=CAP), threads)
    rng = np.random.default_rng(2)
    cos, sin = rope_tables(MAXP)
    ks, vs = ((rng.random((1, KVH, 1, HD)) * 0.03 + 0.02).astype(np.float32) for _ in range(2))
    kb = np.zeros((1, KVH, CAP, HD), np.int8)
    vb = np.zeros_like(kb)
    used = 40
    kb[0, :, :used] = rng.integers(-100, 100, (KVH, used, HD))
    vb[0, :, :used] = rng.integers(-100, 100, (KVH, used, HD))
    kv, vv = ort.OrtValue.ortvalue_from_numpy(kb), ort.OrtValue.ortvalue_from_numpy(vb)
    worst = {"max_error": 0.0, "max_error_if_own_row_unrounded": 0.0, "stored_rows_steps_off": 0}
    for T in (1, 1, 5, 1, 16):
        qkv = rng.standard_normal((1, T, (NH + 2 * KVH) * HD)).astype(np.float32)
        pos = np.arange(used, used + T)[None].astype(np.int64)
        total = used + T
        bias = np.zeros((1, 1, T, total), np.float32)
        for t in range(T):
            bias[0, 0, t, used + t + 1:] = -1e9
        q = qkv[0, :, :NH * HD].reshape(T, NH, HD)
        k = qkv[0, :, NH * HD:(NH + KVH) * HD].reshape(T, KVH, HD).transpose(1, 0, 2)
        v = qkv[0, :, (NH + KVH) * HD:].reshape(T, KVH, HD).transpose(1, 0, 2)
        knew = rot(k, pos[0])
        kq, vq = np.clip(np.rint(knew / ks[0]), -128, 127), np.clip(np.rint(v / vs[0]), -128, 127)
        kold = kv.numpy()[0, :, :used].astype(np.float32) * ks[0]
        vold = vv.numpy()[0, :, :used].astype(np.float32) * vs[0]
        ref = reference(q, np.concatenate([kold, kq * ks[0]], 1), np.concatenate([vold, vq * vs[0]], 1), total, pos[0],
                        bias[0, 0])
        ref_f = reference(q, np.concatenate([kold, knew], 1), np.concatenate([vold, v], 1), total, pos[0], bias[0, 0])
        b = bind_in_place(sess, kv, vv, {"qkv": qkv, "seqlens_k": np.array([total - 1], np.int32),
                                         "total": np.array(total, np.int32), "cos": cos, "sin": sin, "pos": pos,
                                         "bias": bias, "ks": ks, "vs": vs})
        sess.run_with_iobinding(b)
        out = b.copy_outputs_to_cpu()[2][0]
        worst["max_error"] = max(worst["max_error"], float(np.abs(out - ref).max()))
        worst["max_error_if_own_row_unrounded"] = max(worst["max_error_if_own_row_unrounded"],
                                                      float(np.abs(out - ref_f).max()))
        stored = max(np.abs(kv.numpy()[0, :, used:total] - kq).max(), np.abs(vv.numpy()[0, :, used:total] - vq).max())
        worst["stored_rows_steps_off"] = max(worst["stored_rows_steps_off"], int(stored))
        used = total
    print("int8 cache against NumPy:", worst)
    return worst


def cycled(threads: int, layers: int = 30) -> list[dict]:
    """Median microseconds a layer of `layers` decode calls in turn, each over its own buffers, fp32 and int8."""
    cap, out = DECODE_CAP, []
    rng = np.random.default_rng(1)
    cos, sin = rope_tables(cap + 64)
    for int8 in (False, True):
        sess = session(build_decode(int8), threads)
        scale = np.full((1, KVH, 1, HD), 4.0 / 127, np.float32)
        bufs = []
        for _ in range(layers):
            kv = [rng.standard_normal((1, KVH, cap, HD)).astype(np.float32) for _ in range(2)]
            if int8:
                kv = [np.clip(np.rint(x / scale), -127, 127).astype(np.int8) for x in kv]
            bufs.append([ort.OrtValue.ortvalue_from_numpy(x) for x in kv])
        for used in (564, 1076, 1390):
            binds = []
            for kv, vv in bufs:
                feeds = {"qkv": rng.standard_normal((1, 1, (NH + 2 * KVH) * HD)).astype(np.float32),
                         "seqlens_k": np.array([used], np.int32), "total": np.array(used + 1, np.int32), "cos": cos,
                         "sin": sin, "pos": np.array([[used]], np.int64), "bias": np.zeros((1, 1, 1, used + 1), np.float32)}
                if int8:
                    feeds.update(ks=scale, vs=scale)
                binds.append(bind_in_place(sess, kv, vv, feeds))
            ts = []
            for r in range(25):
                t0 = time.perf_counter()
                for b in binds:
                    sess.run_with_iobinding(b)
                if r >= 3:
                    ts.append((time.perf_counter() - t0) / layers)
            us = float(1e6 * np.median(ts))
            out.append({"cache": "int8" if int8 else "float32", "rows_in_use": used, "threads": threads,
                        "decode_us_per_layer_p50": us})
            print(f"{'int8' if int8 else 'fp32'} cache, {used} rows, {layers} layers in turn: {us:.0f} us a layer")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="bench/results/gqa_attention.json")
    a = ap.parse_args()
    rows = [run(c, a.threads) for c in (1, 0)] + [run(0, a.threads, np.float16)]
    rep = {
        "onnxruntime": ort.__version__,
        "shape": {
            "num_heads": NH,
            "kv_num_heads": KVH,
            "head_size": HD,
            "sinks": S,
            "rows": R,
            "window": W,
            "capacity": CAP,
        },
        "runs": rows,
        "int8_cache_check": int8_check(a.threads),
        "cycled": cycled(a.threads),
        "command": f"python bench/gqa_attention.py --threads {a.threads}",
        "note": "float16: the buffers and the kernel in fp16 (a KV cache in fp16); errors against the fp32 reference; "
                "cycled: 30 layers' buffers in turn, fp32 against the kernel's 8-bit cache (per-channel scales)",
    }
    with open(a.json, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
