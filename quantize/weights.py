"""Weight quantization of an exported graph with onnxruntime.quantization (workstation side).

int8 / int4: weight-only, block-wise MatMulNBits (symmetric for int8, asymmetric for int4). On the
default model this keeps 0.96-0.97 top-1 agreement with fp32 at 8 bits where dynamic
MatMulInteger keeps 0.64 (../shared/reference/field-notes.md), so weight-only is the default.

Both first keep, exactly, every weight that already sits on a block grid (`exact_grid`): a GGUF's
Q4_1 blocks (w = d·q + m, q in 0..15, fp16 d and m) become a 4-bit MatMulNBits over d·(q − 8) plus a
small fp32 correction, the block sums of x times (m + 8d); Q8_0 blocks (w = d·q, |q| <= 127) become an
8-bit MatMulNBits. Re-quantizing SmolLM2's Q4_1 weights to asymmetric 4 bits stacks a second rounding
(top-1 agreement 0.69) and even 8 bits add a rounding (0.956); kept exactly, the weights are the fp32
reference's own (0.966: what is left is the kernels' int8 activations), in 6 bits a weight instead of 9.
The embedding Gather is stored fp16 (it is read one row per token, so it costs no bandwidth).
`onnx` and onnxruntime.quantization are imported lazily: the Pi never runs this.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

BLOCK_SIZE = 32
# MatMulNBits accuracy_level 4: activations quantized to int8 and integer dot products (SDOT on the
# A76). On SmolLM2, 2 threads here: 21 ms/token against 205 ms with level 0 (fp32 dequantize path).
ACCURACY_LEVEL = 4


def quantize_graph(src: Path, dst: Path, weights: str, block_size: int = BLOCK_SIZE) -> dict:
    """Quantize src -> dst. Returns a small report (MatMuls quantized, sizes). A graph made of two branches
    (quantize/branches.py) has each branch quantized as a graph of its own, then the two merged again."""
    import onnx

    from cortex_edge.quantize import branches

    if weights not in ("fp32", "int8", "int4"):
        raise ValueError(f"unknown weight format {weights!r}")
    model = onnx.load(str(src))
    if weights == "fp32":
        onnx.save(model, str(dst))
        return {"weights": "fp32", "matmuls_quantized": 0, "bytes": dst.stat().st_size}
    if branches.is_merged(model):
        parts = branches.split(model)
        done = {w: _quantize_model(m, weights, block_size) for w, m in parts.items()}
        out, rep = branches.merge(done[branches.DECODE][0], done[branches.CHUNK][0]), done[branches.CHUNK][1]
    else:
        out, rep = _quantize_model(model, weights, block_size)
    onnx.save(out, str(dst))
    rep["bytes"] = dst.stat().st_size
    return rep


def _quantize_model(model, weights: str, block_size: int):
    bits = 8 if weights == "int8" else 4
    exact = find_exact(model, block_size)
    out = matmul_nbits(model, bits, block_size, exclude=list(exact))
    encode_exact(out, exact, block_size)
    n = sum(1 for node in out.graph.node if node.op_type == "MatMulNBits")
    emb = embeddings_to_fp16(out)
    rep = {"weights": weights, "bits": bits, "block_size": block_size, "accuracy_level": ACCURACY_LEVEL,
           "matmuls_quantized": n, "embedding": emb}
    grids = [g for g, *_ in exact.values()]
    rep["kept_exact"] = {"4-bit grid (Q4_1)": grids.count(4), "8-bit grid (Q8_0)": grids.count(8),
                         f"re-quantized to {bits} bits": n - len(exact)}
    return out, rep


def exact_grid(w, block_size: int = BLOCK_SIZE):
    """w (K, N) float32, an ONNX MatMul weight. If every block of `block_size` values along K is exactly
    d·q + m (q in 0..15, fp16 d and m: GGUF Q4_1) returns (4, q (N, K) uint8, d (N, K/bs), m (N, K/bs));
    else if exactly d·q (|q| <= 127, fp16 d: Q8_0) returns (8, q + 128, d, 0); else None.
    "Exactly": d·q + m recomputed in float32 equals w bit for bit (GGUF dequantizes with that arithmetic)."""
    import numpy as np

    K, N = w.shape
    if K % block_size or w.dtype != np.float32:
        return None
    b = np.ascontiguousarray(w.T).reshape(N, K // block_size, block_size)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = ((hi - lo) / np.float32(15)).astype(np.float16).astype(np.float32)
        q = np.where(d == 0, 0, np.rint((b - lo) / d)).clip(0, 15)
        if (lo.astype(np.float16).astype(np.float32) == lo).all() and (d * q.astype(np.float32) + lo == b).all():
            return 4, q.astype(np.uint8).reshape(N, K), d[..., 0], lo[..., 0]
        d = (np.maximum(np.abs(lo), np.abs(hi)) / np.float32(127)).astype(np.float16).astype(np.float32)
        q = np.where(d == 0, 0, np.rint(b / d)).clip(-127, 127)
        if (d * q.astype(np.float32) == b).all():
            return 8, (q + 128).astype(np.uint8).reshape(N, K), d[..., 0], np.zeros_like(d[..., 0])
    return None


def find_exact(model, block_size: int = BLOCK_SIZE) -> dict:
    """{MatMul node name: exact_grid(...)} for every MatMul whose constant weight sits exactly on a grid."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            g = exact_grid(numpy_helper.to_array(inits[node.input[1]]), block_size)
            if g is not None:
                found[node.name] = g
    return found


def encode_exact(model, exact: dict, block_size: int = BLOCK_SIZE) -> None:
    """Replace each MatMul named in `exact` (left alone by the quantizer) by its exact MatMulNBits encoding.

    8-bit: MatMulNBits over (q + 128) with scales d and the default zero point 128, which is w itself.
    4-bit: MatMulNBits over q with scales d and the default zero point 8 computes x·d(q − 8); the rest of
    w = dq + m, x·(m + 8d), is the sum of x over each block times (m + 8d): Reshape (the graph's
    activations are (B, T, K)), ReduceSum, a (K/bs × N) fp32 MatMul, Add."""
    import numpy as np
    from onnx import helper, numpy_helper

    if not exact:
        return
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = list(g.node)
    uses = Counter(i for n in nodes for i in set(n.input))  # nodes reading each name: one that another reads stays
    del g.node[:]
    for node in nodes:
        if node.name not in exact:
            g.node.append(node)
            continue
        bits, q, d, m = exact[node.name]
        N, K = q.shape
        nb = K // block_size
        x, (y,), name = node.input[0], node.output, node.name
        if bits == 4:
            qb = q.reshape(N, nb, block_size // 2, 2)
            packed = qb[..., 0] | (qb[..., 1] << 4)  # element 2j in the low nibble, 2j + 1 in the high one
        else:
            packed = q.reshape(N, nb, block_size)
        w_name = node.input[1]
        if w_name in inits and uses[w_name] == 1:
            g.initializer.remove(inits.pop(w_name))
        new = [numpy_helper.from_array(np.ascontiguousarray(packed, dtype=np.uint8), f"{name}_exact_q{bits}"),
               numpy_helper.from_array(np.ascontiguousarray(d.reshape(-1), dtype=np.float32), f"{name}_exact_scales")]
        g.initializer.extend(new)
        main = y if bits == 8 else f"{name}_exact_main"
        g.node.append(helper.make_node("MatMulNBits", [x, new[0].name, new[1].name], [main], name=f"{name}_exact",
                                       domain="com.microsoft", K=K, N=N, bits=bits, block_size=block_size,
                                       accuracy_level=ACCURACY_LEVEL))
        if bits == 4:
            corr = (m + 8 * d).T.astype(np.float32)  # (K/bs, N)
            g.initializer.extend([numpy_helper.from_array(np.array([0, 0, nb, block_size], np.int64), f"{name}_blocks"),
                                  numpy_helper.from_array(np.array([-1], np.int64), f"{name}_last"),
                                  numpy_helper.from_array(np.ascontiguousarray(corr), f"{name}_exact_offsets")])
            g.node.extend([
                helper.make_node("Reshape", [x, f"{name}_blocks"], [f"{name}_xb"], name=f"{name}_xb"),
                helper.make_node("ReduceSum", [f"{name}_xb", f"{name}_last"], [f"{name}_xsum"], keepdims=0,
                                 name=f"{name}_xsum"),
                helper.make_node("MatMul", [f"{name}_xsum", f"{name}_exact_offsets"], [f"{name}_corr"],
                                 name=f"{name}_corr"),
                helper.make_node("Add", [main, f"{name}_corr"], [y], name=f"{name}_add")])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def matmul_nbits(model, bits: int, block_size: int = BLOCK_SIZE, exclude: list[str] | None = None):
    """Every MatMul with a constant weight (but those named in exclude) -> MatMulNBits (8: symmetric,
    4: asymmetric), accuracy_level 4. Returns the quantized onnx ModelProto (bench/ort_peer.py quantizes its
    peer with the same call)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=(bits == 8), bits=bits,
                                       accuracy_level=ACCURACY_LEVEL, quant_format=QuantFormat.QOperator,
                                       op_types_to_quantize=("MatMul",))
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    q = MatMulNBitsQuantizer(model, algo_config=cfg, nodes_to_exclude=exclude or [])
    q.process()
    return q.model.model


def embeddings_to_fp16(model) -> str:
    """Store every Gather table (the token embedding) in fp16 and cast the gathered rows to fp32.

    The 8-bit quantizer leaves Gather in fp32 (block-quantized Gather exists only at 4 bits); one row
    is read per token, so the cast costs nothing and the table takes half the bytes on disk and in RAM.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = []
    nodes = list(model.graph.node)
    for node in nodes:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        t = inits[node.input[0]]
        if t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "_fp16")
        model.graph.initializer.remove(t)
        model.graph.initializer.append(half)
        out = node.output[0]
        node.input[0] = half.name
        node.output[0] = out + "_fp16"
        cast = helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT, name=node.name + "_to_fp32")
        model.graph.node.insert(list(model.graph.node).index(node) + 1, cast)
        done.append(t.name)
    return f"fp16 ({', '.join(done)})" if done else "unchanged"
