"""torch -> ONNX: one graph for 1 <= T <= C new tokens (decode and chunks), names from contract.py.

The model is exported twice, a decode graph (T = 1, GroupQueryAttention) and a chunk graph (the exact
attention), and the two become the branches of one If on T = 1 sharing every weight (quantize/branches.py).

Design decision: the graph does the per-token work (transformer + CMS *read*); the CMS *write* (the
jump map) runs in NumPy in the runtime, on the stored (possibly int8) state. The write happens once
every C tokens on a few hundred KB, so it costs nothing to keep it out of the graph, and it lets the
runtime step exactly the state it stores, in whatever format, without a graph per format.
What this leaves out: quantization (quantize/weights.py) and validation (validate.py).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cortex_edge import contract
from cortex_edge.model.lm import CortexLM, GraphLengths
from cortex_edge.runtime import ring

OPSET = 20


class GraphModule(nn.Module):
    """CortexLM.step with flat, named inputs/outputs and batch 1. The output projection is untied.
    gqa: the attention's form (Attention.forward): True for the decode graph, False for the chunk graph."""

    def __init__(self, model: CortexLM, gqa: bool = False):
        super().__init__()
        self.gqa = gqa
        m = copy.deepcopy(model).eval()
        if m.cfg.tie_embeddings:  # quantizers cannot handle a shared Gather/MatMul initializer well
            m.lm_head.weight = nn.Parameter(m.model.embed_tokens.weight.detach().clone())
        for layer in m.model.layers:  # q/k/v and gate/up as one matmul each
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.m = m

    def forward(self, input_ids, q_pos, sink_pos, seqlens_k, total_len, attn_bias, *rest):
        cfg = self.m.cfg
        L, lv = cfg.n_layers, cfg.cms.levels
        row_bias, rest = (rest[0], rest[1:]) if cfg.cms.rows else (None, rest)
        logits_from, state = rest[0], rest[1:]
        pk, pv = list(state[0:2 * L:2]), list(state[1:2 * L:2])
        cms = state[2 * L:2 * L + 2 * lv]
        mems = [t.unsqueeze(0) for t in cms[0::2]]  # (1, N_l, d_l)
        keys = [t.unsqueeze(0) for t in cms[1::2]]
        assert len(mems) == lv
        logits, nk, nv, feat = self.m.step(input_ids, q_pos, sink_pos, attn_bias, row_bias,
                                           GraphLengths(seqlens_k, total_len), pk, pv, mems, keys,
                                           logits_from=logits_from, gqa=self.gqa)
        out = [logits]
        for k, v in zip(nk, nv):
            out += [k, v]
        return tuple(out + [feat])


def example_inputs(cfg, t: int, n_past: int, seed: int = 0, logits_from: int = 0,
                   int8: bool = False) -> dict[str, np.ndarray]:
    """Random but valid graph inputs (buffer values random, bookkeeping from ring.plan_step). int8: the buffers
    of an 8-bit cache."""
    rng = np.random.default_rng(seed)
    lay = ring.Layout.of(cfg)
    R = lay.rows
    row_mask = np.where(rng.random((t, R)) < 0.5, 0.0, ring.NEG_INF).astype(np.float32) if R else None
    plan = ring.plan_step(n_past, t, lay, row_mask)
    feed = {contract.INPUT_IDS: rng.integers(0, cfg.vocab_size, (1, t)).astype(np.int64),
            contract.Q_POS: plan.q_pos, contract.SINK_POS: plan.sink_pos, contract.SEQLENS_K: np.array([plan.total - 1], np.int32),
            contract.TOTAL_LEN: np.array(plan.total, np.int32), contract.ATTN_BIAS: plan.bias,
            contract.LOGITS_FROM: np.array(logits_from, np.int64)}
    if R:
        feed[contract.ROW_BIAS] = plan.row_bias
    for i in range(cfg.n_layers):
        for name in (contract.past_key(i), contract.past_value(i)):
            buf = rng.standard_normal((1, cfg.n_kv_heads, lay.capacity, cfg.head_dim)).astype(np.float32)
            if int8:
                buf = np.clip(np.rint(buf * 40), -128, 127).astype(np.int8)
            buf[:, :, plan.total - t:] = 0  # as the runtime's: nothing beyond the rows in use
            feed[name] = buf
    for lvl, (n, d) in enumerate(zip(cfg.cms.slots, cfg.cms.widths)):
        feed[contract.mem(lvl)] = rng.standard_normal((n, d)).astype(np.float32)
        feed[contract.mem_key(lvl)] = rng.standard_normal((n, cfg.cms.key_dim)).astype(np.float32)
    return feed


def run_torch(module: GraphModule, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The graph's outputs computed by torch (module.gqa must be the form the feed's T takes: T = 1)."""
    cfg = module.m.cfg
    names = contract.input_names(cfg.n_layers, cfg.cms.levels, bool(cfg.cms.rows))
    with torch.no_grad():
        outs = module(*[torch.from_numpy(feed[n]) for n in names])
    return [o.numpy() for o in outs]


def export_graph(model: CortexLM, path: Path) -> None:
    """Write the model's graph to path: the decode and chunk graphs as one If (quantize/branches.py). A model
    with an 8-bit cache (CortexLM.with_kv_cache) gets int8 buffers and its scales as constants."""
    import onnx

    from cortex_edge.quantize import branches

    parts = {}
    for which, gqa in ((branches.DECODE, True), (branches.CHUNK, False)):
        part = path.with_name(f"{path.stem}.{which}.onnx")
        _export_one(GraphModule(model, gqa), part, t=1 if gqa else 2)
        parts[which] = onnx.load(str(part))
        part.unlink()
    onnx.save(branches.merge(parts[branches.DECODE], parts[branches.CHUNK]), str(path))


def _export_one(module: GraphModule, path: Path, t: int) -> None:
    """t: the example's new tokens. The chunk graph needs t >= 2 (the exporter freezes a size of 1 into the
    graph); the decode graph is T = 1 by construction, so its sizes may be frozen."""
    cfg = module.m.cfg
    feed = example_inputs(cfg, t, n_past=cfg.cms.chunk * (1 + cfg.window // cfg.cms.chunk) - t,
                          logits_from=t - 1, int8=module.m.kv_scales is not None)
    in_names = contract.input_names(cfg.n_layers, cfg.cms.levels, bool(cfg.cms.rows))
    out_names = contract.output_names(cfg.n_layers)
    dyn = {contract.INPUT_IDS: {1: "T"}, contract.Q_POS: {1: "T"}, contract.SINK_POS: {1: "T"},
           contract.ATTN_BIAS: {2: "T", 3: "total"}, contract.LOGITS: {1: "T_out"}, contract.WRITE_FEAT: {1: "T"}}
    if cfg.cms.rows:
        dyn[contract.ROW_BIAS] = {2: "T", 3: "total"}
    if t >= 2:
        for i in range(cfg.n_layers):
            dyn[contract.present_key(i)] = {2: "T"}
            dyn[contract.present_value(i)] = {2: "T"}
    args = tuple(torch.from_numpy(feed[n]) for n in in_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=in_names, output_names=out_names,
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          custom_opsets={"com.microsoft": 1})
