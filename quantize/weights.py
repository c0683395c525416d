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
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    bits = 8 if weights == "int8" else 4
    model = onnx.load(str(src))
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=(bits == 8), bits=bits,
                                       accuracy_level=ACCURACY_LEVEL, quant_format=QuantFormat.QOperator,
                                       op_types_to_quantize=("MatMul",))
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    out = q.model.model
    n = sum(1 for node in out.graph.node if node.op_type == "MatMulNBits")
    onnx.save(out, str(dst))
    return {"weights": weights, "bits": bits, "block_size": block_size, "accuracy_level": ACCURACY_LEVEL,
            "matmuls_quantized": n,
            "bytes": dst.stat().st_size}
