"""One graph from two: an `If` on T = 1 over a decode graph and a chunk graph that hold the same weights.

The exporter writes the model twice (export/onnx_export.py): a decode graph (T = 1, GroupQueryAttention)
and a chunk graph (T > 1, the exact attention), with the same inputs and outputs (contract.py). `merge` makes
them the two branches of one `If` on T = 1, every initializer at the top level and each one held once: the
two exports (and their quantized forms: the quantizers are deterministic) hold the same weights bit for bit,
so tensors equal in type, shape and bytes become one, read by both branches from the outer scope. onnxruntime
then prepacks each MatMulNBits weight once (measured: the same RSS as one branch alone). `split` gives the two
graphs back (the quantizers and the graph checks work on plain graphs).
What this leaves out: which graph is which (the caller names them), the quantization itself (weights.py).
"""

from __future__ import annotations

import hashlib

DECODE, CHUNK = "decode", "chunk"  # the If's then and else branches
_PREFIX = {DECODE: "d/", CHUNK: "c/"}


def _key(t) -> tuple:
    from onnx import numpy_helper

    raw = t.raw_data if t.raw_data else numpy_helper.to_array(t).tobytes()
    return t.data_type, tuple(t.dims), hashlib.sha256(raw).hexdigest()


def merge(decode, chunk):
    """decode, chunk: ModelProtos with the same input and output names -> one ModelProto: If(T == 1)."""
    import onnx
    from onnx import TensorProto, helper

    graphs = {DECODE: decode.graph, CHUNK: chunk.graph}
    outs = [o.name for o in chunk.graph.output]
    if [o.name for o in decode.graph.output] != outs:
        raise ValueError("the decode and chunk graphs have different outputs")
    inputs = {i.name: i for i in decode.graph.input}
    inputs.update({i.name: i for i in chunk.graph.input})  # the chunk graph's carry the dynamic T
    order = [i.name for i in chunk.graph.input] + [i.name for i in decode.graph.input
                                                   if i.name not in {j.name for j in chunk.graph.input}]
    shared: dict[tuple, str] = {}  # content -> top-level name
    top_inits = []
    names_taken = set(inputs)
    renames: dict[str, dict[str, str]] = {DECODE: {}, CHUNK: {}}
    for which, g in graphs.items():
        for t in g.initializer:
            k = _key(t)
            if k not in shared:
                name = t.name if t.name not in names_taken else _PREFIX[which] + t.name
                shared[k] = name
                names_taken.add(name)
                t2 = onnx.TensorProto()
                t2.CopyFrom(t)
                t2.name = name
                top_inits.append(t2)
            renames[which][t.name] = shared[k]
    branches = {}
    for which, g in graphs.items():
        ren = renames[which]
        p = _PREFIX[which]

        def name(x, ren=ren, p=p):
            if not x:
                return x  # an omitted optional input
            if x in ren:
                return ren[x]
            return x if x in inputs else p + x

        nodes = []
        for n in g.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[:] = [name(x) for x in n.input]
            m.output[:] = [name(x) for x in n.output]
            if m.name:
                m.name = p + m.name
            nodes.append(m)
        b_outs = [helper.make_tensor_value_info(name(o.name), o.type.tensor_type.elem_type, None) for o in g.output]
        branches[which] = helper.make_graph(nodes, which, [], b_outs)
    t_len = helper.make_node("Shape", ["input_ids"], ["if/shape"], name="if/shape", start=1, end=2)
    one = helper.make_tensor("if/one", TensorProto.INT64, [1], [1])
    eq = helper.make_node("Equal", ["if/shape", "if/one"], ["if/eq"], name="if/eq")
    cond = helper.make_node("Squeeze", ["if/eq"], ["if/decode"], name="if/decode")
    node = helper.make_node("If", ["if/decode"], outs, name="if", then_branch=branches[DECODE],
                            else_branch=branches[CHUNK])
    g_outs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in chunk.graph.output]
    graph = helper.make_graph([t_len, eq, cond, node], "cortex", [inputs[n] for n in order], g_outs,
                              initializer=top_inits + [one])
    opsets = {}
    for m in (decode, chunk):
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=max(decode.ir_version, chunk.ir_version))
    model.producer_name = chunk.producer_name
    return model


def is_merged(model) -> bool:
    return any(n.op_type == "If" and n.name == "if" for n in model.graph.node)


def split(model) -> dict:
    """merge's inverse, up to names: {DECODE: ModelProto, CHUNK: ModelProto}, each a plain graph over the
    top-level inputs and the initializers its branch reads."""
    import onnx
    from onnx import helper

    node = next(n for n in model.graph.node if n.op_type == "If" and n.name == "if")
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for attr in node.attribute:
        which = DECODE if attr.name == "then_branch" else CHUNK
        b = attr.g
        ren = {o.name: n for o, n in zip(b.output, node.output)}  # branch outputs -> the If's (contract) names
        nodes = []
        used = set()
        for n in b.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[:] = [ren.get(x, x) for x in n.input]
            m.output[:] = [ren.get(x, x) for x in n.output]
            used.update(m.input)
            nodes.append(m)
        g_inits = [inits[x] for x in sorted(used) if x in inits]
        outs = [helper.make_tensor_value_info(n, o.type.tensor_type.elem_type, None)
                for n, o in zip(node.output, b.output)]
        g = helper.make_graph(nodes, which, list(model.graph.input), outs, initializer=g_inits)
        out[which] = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return out
