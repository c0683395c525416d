"""The 8-bit attention cache (export --kv-cache int8, quantize/kv_cache.py): the graph, the torch reference
(TorchStream over int8 buffers) and the runtime agree on output and buffers; chunk == token by token; sessions
keep the int8 buffers; a graph and manifest that disagree are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cortex_edge import contract
from tests.conftest import requires_torch


@pytest.fixture(scope="module")
def kv8_plain(tiny, kv8_bundle):
    return tiny[0], kv8_bundle


@pytest.fixture(scope="module")
def kv8_rows(tmp_path_factory):
    from cortex_edge.export.bundle_writer import write_bundle
    from tests.test_rows import _rows_model

    m, tok, meta = _rows_model("recency")  # a row level read 1.25 times louder: its keys must fit the cache too
    out = tmp_path_factory.mktemp("kv8") / "rows"
    write_bundle(m, tok, meta, out, weights="fp32", state="fp32", source="builtin:tiny", quiet=True, kv="int8")
    return m, out


@pytest.fixture(params=["plain", "rows"])
def kv8(request):
    """(model, bundle) with an 8-bit cache, fp32 weights and state: builtin:tiny, and a model with a row level."""
    return request.getfixturevalue("kv8_" + request.param)


def _engine(bundle):
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    return Engine(load_bundle(bundle), threads=1)


def _steps_apart(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[int, float, float]:
    """The largest difference between int8 buffers in steps, the share of entries that differ, and the share
    more than one step apart."""
    d = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b)]
    return (int(max(x.max() for x in d)), float(np.mean([np.mean(x > 0) for x in d])),
            float(np.mean([np.mean(x > 1) for x in d])))


@requires_torch
def test_the_cache_is_int8_with_the_bundles_scales(kv8):
    from cortex_edge.quantize import kv_cache

    model, bundle = kv8
    eng = _engine(bundle)
    man = json.loads((bundle / contract.MANIFEST).read_text())
    assert man["kv_cache"] == "int8" and contract.KV_SCALES in man["files"]
    st = eng.new_state()
    eng.feed(st, np.random.default_rng(0).integers(3, eng.cfg.vocab_size, 100))
    assert all(a.dtype == np.int8 for a in st.keys + st.values)
    used = st.used(eng.lay)
    # the calibration text's keys fill the range without clipping most rows: the scales are neither tiny nor huge
    peak = max(np.abs(k[:, :, eng.lay.rows:used].astype(np.int16)).max() for k in st.keys)
    assert 40 <= peak <= 128, peak
    # the torch model and the runtime hold the same scales
    for (ks, vs), (tk, tv) in zip(eng.kv_scales, model.with_kv_cache(_scales(bundle)).kv_scales):
        np.testing.assert_array_equal(ks[:, 0], tk[0, :, 0].numpy())
        np.testing.assert_array_equal(vs[:, 0], tv[0, :, 0].numpy())
    assert kv_cache.quantize(np.float32([1e9, -1e9]), np.float32(1.0)).tolist() == [127, -128]


def _scales(bundle):
    from safetensors.numpy import load_file

    w = load_file(str(bundle / contract.KV_SCALES))
    n = len(w) // 2
    return [(w[contract.key_scale(i)], w[contract.value_scale(i)]) for i in range(n)]


@requires_torch
def test_runtime_matches_the_torch_reference(kv8):
    """fp32 weights and state: the only rounding is the cache's, and both sides round the same rows the same way
    (the window wraps, the region moves and re-rotates, memory events, rows written and read)."""
    import torch

    from cortex_edge.model.lm import TorchStream

    model, bundle = kv8
    ref_model = model.with_kv_cache(_scales(bundle))
    ids = np.random.default_rng(11).integers(3, 264, 400)
    with torch.no_grad():
        ts = TorchStream(ref_model)
        ref = ts.feed(torch.from_numpy(ids)[None])[0].numpy()
    eng = _engine(bundle)
    st = eng.new_state()
    got = eng.feed(st, ids, all_logits=True)
    assert st.events == ts.events
    np.testing.assert_allclose(got, ref, atol=contract.ATOL_FP32_LOGITS * max(1.0, float(np.abs(ref).max())))
    steps, share, _ = _steps_apart(st.keys + st.values, [t.numpy() for t in ts.keys + ts.values])
    assert steps <= 1 and share < 1e-3, (steps, share)  # a value within fp32 noise of a half step may round apart
    if eng.cfg.cms.rows:
        assert len(ts.row_writes) > 0
        np.testing.assert_array_equal(st.rows.token, ts.row_token[0].numpy())
    # the rounding is there: the same model with fp32 buffers computes (slightly) other logits
    with torch.no_grad():
        fp = TorchStream(model).feed(torch.from_numpy(ids)[None])[0].numpy()
    assert np.abs(fp - ref).max() > 1e-4


def _chunk_vs_token(bundle):
    eng = _engine(bundle)
    ids = np.random.default_rng(5).integers(3, eng.cfg.vocab_size, 300)
    a, b = eng.new_state(), eng.new_state()
    la = eng.feed(a, ids, all_logits=True)
    lb = eng.feed(b, ids, max_piece=1, all_logits=True)
    assert a.events == b.events >= 3 and a.n > eng.cfg.sinks + eng.cfg.window
    # measured 1.0e-5 of the logits' scale on builtin:tiny: well inside the int8-weights paths tolerance
    np.testing.assert_allclose(la, lb, atol=contract.RTOL_PATHS["int8"] * max(1.0, float(np.abs(la).max())))
    assert np.mean(la.argmax(-1) == lb.argmax(-1)) >= 0.98
    eng.place(b, 0)  # both in the sinks' own frame
    # a flip in one layer moves the next layers' inputs by a step, and a few rows cascade further (as in validation;
    # measured here: 1 in 4,000 with rows)
    steps, share, far = _steps_apart(a.keys + a.values, b.keys + b.values)
    assert steps <= contract.KV8_STEPS and share < 1e-2 and far <= contract.KV8_FAR_FRACTION / 10, (steps, share, far)


@pytest.mark.aarch64
def test_chunk_equals_token_by_token(kv8_bundle):
    """The decode branch (GroupQueryAttention's own 8-bit cache, the sinks re-rounded in each token's frame)
    against the chunk branch (the exact attention over the same int8 buffers); also on the emulated A76."""
    _chunk_vs_token(kv8_bundle)


@requires_torch
def test_chunk_equals_token_by_token_with_rows(kv8_rows):
    _chunk_vs_token(kv8_rows[1])


@requires_torch
def test_sessions_keep_the_int8_cache(kv8_rows, tmp_path):
    from cortex_edge.runtime import session as sess

    _, bundle = kv8_rows
    eng = _engine(bundle)
    st = eng.new_state()
    eng.feed(st, np.random.default_rng(2).integers(3, eng.cfg.vocab_size, 150))
    p = tmp_path / "s.cxs"
    sess.save(p, eng, st, {})
    back, _, _ = sess.load(p, eng)
    for x, y in zip(st.keys + st.values, back.keys + back.values):
        assert y.dtype == np.int8
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(eng.feed(st.copy(), [5, 6, 7]), eng.feed(back, [5, 6, 7]))


@pytest.mark.aarch64
def test_a_manifest_that_misstates_the_cache_is_refused(kv8_bundle, tmp_path):
    import shutil

    from cortex_edge.runtime.errors import BundleError

    b = tmp_path / "b"
    shutil.copytree(kv8_bundle, b)
    man = json.loads((b / contract.MANIFEST).read_text())
    man["kv_cache"] = "fp32"
    (b / contract.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(BundleError, match="attention buffers are"):
        _engine(b)
    man["kv_cache"] = "int4"
    (b / contract.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(BundleError, match="unknown attention cache format"):
        _engine(b)


@requires_torch
def test_the_cli_exports_and_runs_an_int8_cache(tmp_path):
    from tests.test_cli import cli

    b = tmp_path / "b"
    r = cli("export", "builtin:tiny", "--out", b, "--kv-cache", "int8")
    assert r.returncode == 0 and "int8 attention cache" in r.stdout, r.stderr
    r = cli("info", b)
    assert r.returncode == 0 and "attention cache int8" in r.stdout, r.stderr
    r = cli("chat", b, "--session", "s", "--prompt", "Hello there.", "--max-new-tokens", "6", env_home=tmp_path)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = cli("bench", b, "--context", "0,200", "--new-tokens", "4", "--json", tmp_path / "bench.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["kv_cache"] == "int8"


@requires_torch
def test_the_trained_memory_recalls_with_an_int8_cache(tmp_path):
    """builtin:recall (byte level) with an 8-bit cache: its digits' keys and values reach 1.5-4.5 times what prose
    does, so scales from prose alone clipped them and it recalled 1 pass key in 10 at 1k and 4k; the calibration's
    chat and code texts cover them. The same thresholds as its fp32-cache test (test_niah.py)."""
    from cortex_edge.export.pipeline import export_model
    from cortex_edge.runtime import niah

    out = tmp_path / "recall-kv8"
    export_model("builtin:recall", out, weights="int8", state="int8", quiet=True, kv="int8")
    rep = niah.run(_engine(out), [1024, 4096], 10, (True, False))
    acc = {(r["length"], r["memory"]): r["accuracy"] for r in rep["rows"]}
    assert acc[1024, True] >= 0.9 and acc[4096, True] >= 0.9, acc
    assert acc[1024, False] <= 0.1 and acc[4096, False] <= 0.1, acc


@requires_torch
def test_the_calibration_texts_cover_prose_chat_and_code():
    from cortex_edge.export import kv_calibrate
    from cortex_edge.export.builtin import builtin

    _, tok, meta = builtin("builtin:tiny")
    texts = kv_calibrate.calibration_ids(tok, tok.get_vocab_size(), meta)
    assert texts[0].size == kv_calibrate.TOKENS and all(512 <= t.size <= kv_calibrate.OTHER_TOKENS for t in texts[1:])
    chat, code = (tok.decode(t.tolist(), skip_special_tokens=False) for t in texts[1:])
    assert "<|im_start|>" in chat and "The pass key is" in chat and "Thank you" in chat, chat[-300:]
    assert "def f_" in code and sum(c.isdigit() for c in code) > 200


@requires_torch
def test_validation_tells_rounding_from_a_wrong_scale(tiny, tmp_path):
    """The export's check allows a few cascaded rounding flips (contract.KV8_STEPS, KV8_FAR_FRACTION), and must
    still fail a graph whose value scales are 5 % off the reference's (it then rounds most rows elsewhere)."""
    from cortex_edge.export import kv_calibrate, onnx_export, validate

    model, tok, meta = tiny
    scales = kv_calibrate.calibrate(model, kv_calibrate.calibration_ids(tok, tok.get_vocab_size(), meta))
    good = model.with_kv_cache(scales)
    path = tmp_path / "graph.onnx"
    onnx_export.export_graph(good, path)
    ok = validate.validate_graphs(good, path)
    assert ok["passed"], ok["worst"]
    off = model.with_kv_cache([(k, v * 1.05) for k, v in scales])
    bad = validate.validate_graphs(off, path)
    assert not bad["passed"] and max(bad["far_fraction"].values()) > contract.KV8_FAR_FRACTION, bad["far_fraction"]
