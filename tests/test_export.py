"""torch vs ONNX (decode and chunk graphs, state included) and torch vs the NumPy runtime stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cortex_edge import contract
from tests.conftest import requires_torch

pytestmark = requires_torch


def test_graphs_match_torch_output_by_output(bundle_fp32):
    rep = json.loads((bundle_fp32 / contract.MANIFEST).read_text())["validation"]["graphs"]
    assert rep["passed"]
    assert set(rep["max_abs_diff"]) == set(contract.output_names(2))  # every output, state included
    assert {c["T"] for c in rep["cases"]} == {1, 3, 16}
    assert rep["worst"] <= contract.RTOL_VALIDATION
    assert max(rep["max_abs_diff"].values()) <= contract.ATOL_FP32_LOGITS  # tiny model: absolute too


def test_graphs_fresh_random_inputs(tiny, bundle_fp32):
    """Independent of the manifest: rerun the graphs against torch here, on new seeds."""
    import onnxruntime as ort

    from cortex_edge.export.onnx_export import GraphModule, example_inputs, run_torch

    model = tiny[0]
    cfg = model.cfg
    C = cfg.cms.chunk
    modules = {t: GraphModule(model, gqa=t == 1) for t in (1, C, 5)}  # T = 1: the decode branch
    sess = ort.InferenceSession(str(bundle_fp32 / contract.GRAPH), providers=["CPUExecutionProvider"])
    for t, module in modules.items():
        for n_past in (0, 2, 51, 10**6):
            n_past -= n_past % C if n_past % C + t > C else 0  # a step never crosses a chunk
            for first in {0, t - 1}:  # logits of every new token, or of the last only
                feed = example_inputs(cfg, t, n_past, seed=n_past + 77, logits_from=first)
                outs = sess.run(contract.output_names(cfg.n_layers), feed)
                assert outs[0].shape[1] == t - first
                for got, ref in zip(outs, run_torch(module, feed)):
                    np.testing.assert_allclose(got, ref, atol=contract.ATOL_FP32_LOGITS, rtol=0)


def test_graph_at_the_largest_rotary_position(tiny, bundle_fp32):
    """The exported rotation reads cos/sin tables (lm.ropes_at, positions 0..Layout.max_position): the chunk that
    reaches the largest position a stream takes (found by walking the plans) is within them and matches torch,
    and so does the decode step at that position."""
    import onnxruntime as ort

    from cortex_edge.export.onnx_export import GraphModule, example_inputs, run_torch
    from cortex_edge.runtime import ring

    model = tiny[0]
    cfg = model.cfg
    lay, C = ring.Layout.of(cfg), cfg.cms.chunk
    top, n_past = max((int(ring.plan_step(n, C, lay).q_pos.max()), n) for n in range(0, 20 * cfg.window, C))
    assert cfg.window < top <= lay.max_position
    sess = ort.InferenceSession(str(bundle_fp32 / contract.GRAPH), providers=["CPUExecutionProvider"])
    for t, n, gqa in ((C, n_past, False), (1, n_past + C - 1, True)):
        feed = example_inputs(cfg, t, n, seed=5)
        assert int(feed[contract.Q_POS].max()) == top
        for got, ref in zip(sess.run(contract.output_names(cfg.n_layers), feed),
                            run_torch(GraphModule(model, gqa), feed)):
            np.testing.assert_allclose(got, ref, atol=contract.ATOL_FP32_LOGITS, rtol=0)


def _stream(tiny, ids):
    import torch

    from cortex_edge.model.lm import TorchStream

    with torch.no_grad():
        ts = TorchStream(tiny[0])
        return ts, ts.feed(torch.from_numpy(ids)[None])[0].numpy()


@pytest.mark.aarch64
def test_runtime_matches_torch_stream_fp32(tiny, bundle_fp32):
    """300 tokens: window wraps, 18 memory events; logits and every CMS level."""
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    ids = np.random.default_rng(11).integers(3, 264, 300)
    ts, ref = _stream(tiny, ids)
    eng = Engine(load_bundle(bundle_fp32), threads=1)
    st = eng.new_state()
    got = eng.feed(st, ids, all_logits=True)
    assert st.events == ts.events == 300 // 16
    np.testing.assert_allclose(got, ref, atol=contract.ATOL_FP32_LOGITS)
    for lvl, (m, k) in enumerate(st.views):
        np.testing.assert_allclose(m, ts.mems[lvl][0].numpy(), atol=contract.ATOL_FP32_STATE)
        np.testing.assert_allclose(k, ts.mem_keys[lvl][0].numpy(), atol=contract.ATOL_FP32_STATE)
        np.testing.assert_allclose(st.levels[lvl].usage, ts.usage[lvl][0].numpy(), atol=contract.ATOL_FP32_STATE)
    for i in range(2):
        np.testing.assert_allclose(st.keys[i], ts.keys[i].numpy(), atol=contract.ATOL_FP32_STATE)
        np.testing.assert_allclose(st.values[i], ts.values[i].numpy(), atol=contract.ATOL_FP32_STATE)


def test_int8_bundle_agrees_with_torch(tiny, bundle_int8):
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    ids = np.random.default_rng(12).integers(3, 264, 200)
    ts, ref = _stream(tiny, ids)
    eng = Engine(load_bundle(bundle_int8), threads=1)
    got = eng.feed(eng.new_state(), ids, all_logits=True)
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    assert agree >= 0.95, agree
    assert np.abs(got - ref).max() < 0.1


def test_manifest_records_quantization_and_stream_validation(bundle_int8):
    man = json.loads((bundle_int8 / contract.MANIFEST).read_text())
    assert man["weights"] == "int8" and man["state"] == "int8"
    assert man["quantization"][contract.GRAPH]["matmuls_quantized"] > 0
    v = man["validation"]["stream"]
    assert v["tokens"] == 300 and v["events"] >= 3 and v["window_wrapped"]
    assert len(v["state"]) == 3


def test_gguf_pre_tokenizers_split_as_their_models_do():
    """llama.cpp's tokenizer.ggml.pre names: Llama 3 groups digits by three, Qwen2 and SmolLM2 one by one,
    GPT-2 keeps a number whole; an unknown name is refused, not tokenized another way."""
    from cortex_edge.export.loaders import gguf_pre_tokenizer
    from cortex_edge.runtime.errors import CortexError

    def split(name):
        return [w for w, _ in gguf_pre_tokenizer(name).pre_tokenize_str("I've 12345 cats!!\n\nOK")]

    assert split("llama-bpe") == ["I", "'ve", "Ġ", "123", "45", "Ġcats", "!!ĊĊ", "OK"]
    assert split("qwen2") == ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġcats", "!!ĊĊ", "OK"]
    assert split("smollm") == ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġcats", "!!", "Ċ", "Ċ", "OK"]
    assert split("default") == ["I", "'ve", "Ġ12345", "Ġcats", "!!", "Ċ", "Ċ", "OK"]
    with pytest.raises(CortexError, match="tokenizer.ggml.pre"):
        gguf_pre_tokenizer("deepseek-llm")


def test_the_two_branches_share_every_weight(bundle_int8):
    """The graph is an If on T = 1 whose branches hold no weight of their own: every initializer sits once at the
    top level (quantize/branches.py), so the bundle holds the weights once, and splitting it gives back two
    graphs that each read all of them."""
    import onnx

    from cortex_edge.quantize import branches

    m = onnx.load(str(bundle_int8 / contract.GRAPH))
    assert branches.is_merged(m)
    node = next(n for n in m.graph.node if n.op_type == "If")
    for attr in node.attribute:
        assert not attr.g.initializer
        assert any(n.op_type == "MatMulNBits" for n in attr.g.node)  # the weights are read from outside
    names = [t.name for t in m.graph.initializer]
    assert len(names) == len(set(names))
    parts = branches.split(m)
    weights = {t.name for t in m.graph.initializer if len(t.dims) >= 2}
    for part in parts.values():
        assert weights <= {t.name for t in part.graph.initializer} | {"if/one"}
