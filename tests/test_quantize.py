"""Weight quantization (quantize/weights.py): weights already on a GGUF block grid are kept exactly."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
gguf = pytest.importorskip("gguf")

from cortex_edge.quantize import weights as wq  # noqa: E402

K, N, T = 64, 48, 5


def _grid(kind: str, seed: int) -> np.ndarray:
    """A (K, N) MatMul weight whose rows (N, K) went through GGUF `kind` and back."""
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(seed).standard_normal((N, K)).astype(np.float32) * 0.05
    t = getattr(gguf.GGMLQuantizationType, kind)
    return np.ascontiguousarray(dequantize(quantize(w, t), t).reshape(N, K).T.astype(np.float32))


def _decode(model, node_name: str, bits: int) -> np.ndarray:
    """The weight the exact MatMulNBits encoding of node_name stands for, decoded in NumPy: (K, N)."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, d = init[f"{node_name}_exact_q{bits}"], init[f"{node_name}_exact_scales"].reshape(N, -1)
    if bits == 4:
        q = np.stack([q & 15, q >> 4], axis=-1).reshape(N, -1)
        w = d.repeat(wq.BLOCK_SIZE, 1) * (q.astype(np.float32) - 8)
        w = w + init[f"{node_name}_exact_offsets"].T.repeat(wq.BLOCK_SIZE, 1)
    else:
        w = d.repeat(wq.BLOCK_SIZE, 1) * (q.reshape(N, -1).astype(np.float32) - 128)
    return w.T


def test_exact_grid_recognises_gguf_blocks():
    bits, q, d, m = wq.exact_grid(_grid("Q4_1", 0))
    assert bits == 4 and q.max() <= 15 and q.shape == (N, K) and d.shape == m.shape == (N, K // wq.BLOCK_SIZE)
    assert wq.exact_grid(_grid("Q8_0", 1))[0] == 8
    assert wq.exact_grid(np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)) is None
    off = _grid("Q4_1", 3)
    off[7, 3] += 1e-3  # one value off the grid: not exact
    assert wq.exact_grid(off) is None


def _graph(ws: list[np.ndarray], path):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for i, w in enumerate(ws):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}"))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, None, N]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, str(path))


def test_int4_keeps_grid_weights_exactly_and_requantizes_the_rest(tmp_path):
    import onnxruntime as ort

    ws = [_grid("Q4_1", 4), _grid("Q8_0", 5), np.random.default_rng(6).standard_normal((K, N)).astype(np.float32) * 0.05]
    _graph(ws, tmp_path / "f.onnx")
    rep = wq.quantize_graph(tmp_path / "f.onnx", tmp_path / "q.onnx", "int4")
    assert rep["kept_exact"] == {"4-bit grid (Q4_1)": 1, "8-bit grid (Q8_0)": 1, "re-quantized to 4 bits": 1}
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert np.array_equal(_decode(model, "mm0", 4), ws[0])  # bit for bit: d(q - 8) + (m + 8d) = dq + m
    assert np.array_equal(_decode(model, "mm1", 8), ws[1])

    # through onnxruntime: the kept-exact weight is only off by the kernel's int8 activations; re-quantizing the
    # same Q4_1 weight to asymmetric 4 bits (what int4 did before) is several times further off
    x = np.random.default_rng(7).standard_normal((1, T, K)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    _graph([ws[0]], tmp_path / "f0.onnx")
    onnx.save(wq.matmul_nbits(onnx.load(str(tmp_path / "f0.onnx")), 4), str(tmp_path / "r0.onnx"))
    requant = ort.InferenceSession(str(tmp_path / "r0.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err_exact = np.abs(got[0] - x @ ws[0]).max()
    err_requant = np.abs(requant - x @ ws[0]).max()
    assert err_exact < 0.25 * err_requant, (err_exact, err_requant)
    ref1, ref2 = x @ ws[1], x @ ws[2]
    assert np.abs(got[1] - ref1).max() < 0.02 * np.abs(ref1).max()  # Q8_0 kept: activation rounding only
    assert np.abs(got[2] - ref2).max() < 0.2 * np.abs(ref2).max()  # off-grid: 4-bit asymmetric re-quantization


def test_int8_keeps_grids_too_and_requantizes_the_rest_at_8_bits(tmp_path):
    """int8 promises no worse than 8-bit block rounding: a weight exactly on a 4-bit grid stays there (exact
    and smaller); a weight on no grid gets 8 bits, far closer than 4."""
    import onnxruntime as ort

    ws = [_grid("Q4_1", 8), np.random.default_rng(9).standard_normal((K, N)).astype(np.float32) * 0.05]
    _graph(ws, tmp_path / "f.onnx")
    rep = wq.quantize_graph(tmp_path / "f.onnx", tmp_path / "q.onnx", "int8")
    assert rep["kept_exact"] == {"4-bit grid (Q4_1)": 1, "8-bit grid (Q8_0)": 0, "re-quantized to 8 bits": 1}
    assert np.array_equal(_decode(onnx.load(str(tmp_path / "q.onnx")), "mm0", 4), ws[0])
    x = np.random.default_rng(10).standard_normal((1, T, K)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    ref = x @ ws[1]
    assert np.abs(got[1] - ref).max() < 0.02 * np.abs(ref).max()
