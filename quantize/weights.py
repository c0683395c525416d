"""Weight quantization of an exported graph with onnxruntime.quantization (workstation side).

int8 / int4: weight-only, block-wise MatMulNBits (symmetric for int8, asymmetric for int4). On the
default model this keeps 0.96-0.97 top-1 agreement with fp32 at 8 bits where dynamic
MatMulInteger keeps 0.64 (../shared/reference/field-notes.md), so weight-only is the default.
The embedding Gather stays fp32 (it is read one row per token, so it costs no bandwidth).
`onnx` and onnxruntime.quantization are imported lazily: the Pi never runs this.
"""

from __future__ import annotations

import logging
from pathlib import Path

BLOCK_SIZE = 32
# MatMulNBits accuracy_level 4: activations quantized to int8 and integer dot products (SDOT on the
# A76). On SmolLM2, 2 threads here: 21 ms/token against 205 ms with level 0 (fp32 dequantize path).
ACCURACY_LEVEL = 4


def quantize_graph(src: Path, dst: Path, weights: str, block_size: int = BLOCK_SIZE) -> dict:
    """Quantize src -> dst. Returns a small report (MatMuls quantized, sizes)."""
    import onnx

    if weights == "fp32":
        model = onnx.load(str(src))
        onnx.save(model, str(dst))
        return {"weights": "fp32", "matmuls_quantized": 0, "bytes": dst.stat().st_size}
    if weights not in ("int8", "int4"):
        raise ValueError(f"unknown weight format {weights!r}")
    bits = 8 if weights == "int8" else 4
    out = matmul_nbits(onnx.load(str(src)), bits, block_size)
    n = sum(1 for node in out.graph.node if node.op_type == "MatMulNBits")
    emb = embeddings_to_fp16(out)
    onnx.save(out, str(dst))
    return {"weights": weights, "bits": bits, "block_size": block_size, "accuracy_level": ACCURACY_LEVEL,
            "matmuls_quantized": n, "embedding": emb,
            "bytes": dst.stat().st_size}


def matmul_nbits(model, bits: int, block_size: int = BLOCK_SIZE):
    """Every MatMul with a constant weight -> MatMulNBits (8: symmetric, 4: asymmetric), accuracy_level 4.
    Returns the quantized onnx ModelProto (bench/ort_peer.py quantizes its peer with the same call)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=(bits == 8), bits=bits,
                                       accuracy_level=ACCURACY_LEVEL, quant_format=QuantFormat.QOperator,
                                       op_types_to_quantize=("MatMul",))
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
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
