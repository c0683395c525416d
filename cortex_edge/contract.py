"""Every name the exporter and the runtime must agree on: files, graph inputs/outputs, formats.

Stdlib only. Like gguf-py's constants.py, nothing else defines these strings; change one here and
bump CONTRACT_VERSION. What this leaves out: shapes (see the table below, checked by tests).

One graph serves decode (T = 1) and chunks (1 < T <= C), one set of weights: its one top-level node is an
`If` on T = 1 whose two branches read the weights from the outer scope (onnxruntime prepacks them once):
  T = 1   the decode graph: each layer's attention one GroupQueryAttention over the buffer, written in place
          (the runtime binds past and present to one OrtValue, and has written the sinks and rows rotated to
          the token's frame, runtime/ring.py)
  T > 1   the chunk graph: the exact attention (two rotations of the queries); present_key/value are then the
          new tokens' rows only, (1, KV, T, hd), which the runtime writes into the buffer

Graph signature (M = runtime/ring.py Layout.capacity: [R rows | S sinks | the recent tokens]):

  input_ids          (1, T)            int64    new tokens
  q_pos              (1, T)            int64    RoPE position of each new token (bounded, see runtime/ring.py)
  sink_pos           (1, T)            int64    its position against the sinks and rows (chunks only)
  seqlens_k          (1,)              int32    total - 1, as GroupQueryAttention takes it
  total_len          ()                int32    buffer rows in use once the new tokens are written at
                                                total - T .. total - 1 (every layer the same)
  attn_bias          (1, 1, T, total)  float32  additive visibility in the layers without the row level
  row_bias           (1, 1, T, total)  float32  the same in the row level's layers (only with a row level)
  logits_from        ()                int64    first new token whose logits are computed: 0 all, T-1 the
                                                last only (a prompt's chunks skip the lm_head for the rest)
  past_key.{i}       (1, KV, M, hd)    float32  layer i's key buffer, keys stored rotated (int8 in a bundle that
                                                keeps an 8-bit cache: x = q * scale, KV_SCALES below)
  past_value.{i}     (1, KV, M, hd)    float32  its value buffer (int8 likewise)
  mem.{l}            (N_l, d_l)        float32  CMS level l memory (dequantized stored state)
  mem_key.{l}        (N_l, d_k)        float32  CMS level l keys
->
  logits             (1, T - logits_from, V) float32
  present_key.{i}    (1, KV, M, hd)    float32  T = 1: the buffers with the new rows written: the runtime binds
  present_value.{i}  (1, KV, M, hd)    float32  past and present to one OrtValue, so the graph writes them in
                                                place; T > 1: the new rows, (1, KV, T, hd)
  write_feat         (1, T, d_z)       float32  compressed hidden state per token (the jump map's input)
"""

from __future__ import annotations

CONTRACT_VERSION = 5  # 2: keys cached rotated (no win_pos), sink_q_pos, logits_from; 3: values cached transposed
# (+ row_key, row_value, row_mask with a row level); 4: one buffer per layer, attention as GroupQueryAttention;
# 5: an If on T = 1: GroupQueryAttention for decode, the exact attention for chunks (+ sink_pos)
BUNDLE_FORMAT = "cortex-edge-bundle"

# ---- files inside a bundle
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
GRAPH = "model.onnx"
CMS_WRITE_WEIGHTS = "cms_write.safetensors"
KV_SCALES = "kv_scales.safetensors"  # an int8 attention cache's scales (only in bundles that keep one)

# ---- graph inputs
INPUT_IDS = "input_ids"
Q_POS = "q_pos"
SINK_POS = "sink_pos"
SEQLENS_K = "seqlens_k"
TOTAL_LEN = "total_len"
ATTN_BIAS = "attn_bias"
ROW_BIAS = "row_bias"
LOGITS_FROM = "logits_from"


def past_key(i: int) -> str:
    return f"past_key.{i}"


def past_value(i: int) -> str:
    return f"past_value.{i}"


def mem(level: int) -> str:
    return f"mem.{level}"


def mem_key(level: int) -> str:
    return f"mem_key.{level}"


# ---- graph outputs
LOGITS = "logits"
WRITE_FEAT = "write_feat"


def present_key(i: int) -> str:
    return f"present_key.{i}"


def present_value(i: int) -> str:
    return f"present_value.{i}"


def input_names(n_layers: int, n_levels: int, rows: bool = False) -> list[str]:
    names = [INPUT_IDS, Q_POS, SINK_POS, SEQLENS_K, TOTAL_LEN, ATTN_BIAS] + ([ROW_BIAS] if rows else []) + [LOGITS_FROM]
    for i in range(n_layers):
        names += [past_key(i), past_value(i)]
    for level in range(n_levels):
        names += [mem(level), mem_key(level)]
    return names


def output_names(n_layers: int) -> list[str]:
    names = [LOGITS]
    for i in range(n_layers):
        names += [present_key(i), present_value(i)]
    return names + [WRITE_FEAT]


# ---- the jump map's weights (NumPy side), stored in CMS_WRITE_WEIGHTS.  Keys are the torch
# parameter names of cortex_edge.model.cms.CMSWriter, prefixed by nothing.
WRITE_QUERY = "query.weight"  # (d_k, d_z): query that reads the level below during consolidation


# the row level's write gate (runtime/rows.py), in the same file
ROWS_Z_WEIGHT = "rows.z.weight"  # (d_z, d_z)
ROWS_Z_BIAS = "rows.z.bias"  # (d_z,)
ROWS_GATE_WEIGHT = "rows.gate.weight"  # (1, d_z)
ROWS_GATE_BIAS = "rows.gate.bias"  # (1,)


def write_param(level: int, name: str) -> str:
    """name in: z.weight z.bias gate.weight gate.bias value.weight key.weight decay.weight decay.bias
    (shapes: runtime/cms.py write_param_shapes)"""
    return f"levels.{level}.{name}"



# ---- formats
WEIGHT_FORMATS = ("fp32", "int8", "int4")  # int8/int4: weight-only block-wise MatMulNBits; weights already on
# a GGUF block grid (Q4_1, Q8_0) are kept exactly in either (quantize/weights.py)
STATE_FORMATS = ("fp32", "fp16", "int8")  # CMS state between steps; int8 has a scale per slot
KV_FORMATS = ("fp32", "int8")  # the attention buffers; int8: static scales per layer, KV head and channel, chosen
# at export (quantize/kv_cache.py), held in KV_SCALES and in the graph (GroupQueryAttention's k_scale / v_scale)
DEFAULT_KV = "fp32"


def key_scale(i: int) -> str:
    """KV_SCALES tensor: layer i's key scale (KV, hd) float32"""
    return f"key_scale.{i}"


def value_scale(i: int) -> str:
    return f"value_scale.{i}"

DEFAULT_WEIGHTS = "int8"
DEFAULT_STATE = "int8"

# ---- sessions (durable chat state)
SESSION_MAGIC = "cortex-edge-session"
SESSION_VERSION = 5  # 2: ring keys stored rotated in the frame of runtime/ring.py; 3: values transposed;
# 4: the attention buffers of runtime/ring.py; 5: their sinks and rows in the sinks' own frame
# (a model with a row level adds rows.* tensors; its bundle's fingerprint differs from any model without one)
SESSION_SUFFIX = ".cxs"

# ---- validation tolerances (export vs torch), named as optimum's ATOL_FOR_VALIDATION
ATOL_FP32_LOGITS = 1e-3  # absolute, on builtin:tiny (tests)
ATOL_FP32_STATE = 1e-4
# export validation: max |onnx - torch| / max(1, max |torch|) per output. fp32 summation order differs
# between torch and onnxruntime; over 30 layers that is ~1e-4 of the logits' scale on SmolLM2.
RTOL_VALIDATION = 2e-3
# with an 8-bit attention cache the graph rounds every new row: where torch and onnxruntime compute a value within
# fp32 noise of a half step, one rounds up and the other down, and the next layers see inputs a step apart. Measured
# on SmolLM2 (random buffers, T = 1, 3, 64): logits 4.1e-3 of their scale; 2-5 % of a late layer's rows a step
# apart, and flips that cascade through 30 layers leave a few 2-3 steps apart (the last layer's values: 17 of 12,288).
# A wrong scale or offset moves most rows: rows more than a step apart must stay rare, and none beyond KV8_STEPS.
RTOL_VALIDATION_KV8 = 2e-2
KV8_STEPS = 3
KV8_FAR_FRACTION = 1e-2  # of a buffer's rows more than one step apart
# decode path (T = 1) against chunk path (T > 1) in the runtime, relative to the logits' scale. Quantized
# weights run MatMulNBits with int8 activations whose one-row and many-row kernels round differently:
# measured up to 5e-4 (x86_64) and 6.9e-3 (aarch64, Cortex-A76 under qemu) on builtin:tiny int8.
RTOL_PATHS = {"fp32": 1e-5, "int8": 2e-2, "int4": 5e-2}
