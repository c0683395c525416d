"""The CLI as a user runs it: export -> chat (memory across restarts) -> bench -> info, and bad input
always ending in one clear line and a non-zero exit, with nothing on disk lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from cortex_edge import contract
from tests.conftest import requires_torch


def cli(*args, env_home=None, input=None, timeout=300):
    import os

    env = dict(os.environ)
    if env_home is not None:
        env["CORTEX_EDGE_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-m", "cortex_edge", *map(str, args)], capture_output=True, text=True,
                          env=env, input=input, timeout=timeout)


def one_line_error(r):
    assert r.returncode != 0, r.stdout
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@requires_torch
def test_export_chat_restart_bench_info(tmp_path):
    b = tmp_path / "bundle"
    r = cli("export", "builtin:tiny", "--out", b, "--weights", "int8", "--state", "int8")
    assert r.returncode == 0, r.stderr
    assert (b / contract.MANIFEST).is_file()
    assert "Warning" not in r.stderr, r.stderr  # the exporter's own log stays out of the user's terminal
    home = tmp_path / "home"
    r = cli("chat", b, "--session", "s1", "--prompt", "Remember: the code is 4172.", "--max-new-tokens", "12",
            "--seed", "0", env_home=home)
    assert r.returncode == 0, r.stderr
    spath = home / "sessions" / "s1.cxs"
    first = spath.read_bytes()
    # restart: a new process loads the saved memory and continues from it
    r = cli("chat", b, "--session", "s1", "--prompt", "What is the code?", "--max-new-tokens", "12", "--seed", "0",
            env_home=home)
    assert r.returncode == 0, r.stderr
    from cortex_edge.runtime import session as sess
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    eng = Engine(load_bundle(b), threads=1)
    st2, extra2, _ = sess.load(spath, eng)
    (tmp_path / "one.cxs").write_bytes(first)
    st1, extra1, _ = sess.load(tmp_path / "one.cxs", eng)
    assert extra1["turns"] == 1 and extra2["turns"] == 2
    assert st2.n > st1.n > 0 and st2.events >= 1
    # the same second turn from a fresh session gives a different state: memory carried the first turn
    r = cli("chat", b, "--session", "fresh", "--prompt", "What is the code?", "--max-new-tokens", "12", "--seed", "0",
            env_home=home)
    st3, _, _ = sess.load(home / "sessions" / "fresh.cxs", eng)
    assert st3.n < st2.n
    r = cli("bench", b, "--context", "0,100,1k", "--new-tokens", "8", "--json", tmp_path / "bench.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "bench.json").read_text())
    for k in ("decode_ms_p50", "decode_ms_p95", "decode_ms_p99", "prefill_tokens_per_s", "time_to_first_token_s",
              "state_bytes_per_level", "rss_bytes"):
        assert k in rep["results"][-1]
    assert len(rep["state_bytes_per_level"]) == 3 and rep["peak_rss_bytes"] > 0 and rep["caches"]["L2"] > 0
    r = cli("info", b)
    assert r.returncode == 0 and "checksums OK" in r.stdout


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory, request):
    return request.getfixturevalue("runtime_bundle")


def _mutated(tmp_path, src, fn):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    fn(dst)
    return dst


def _set_manifest(key, value):
    def fn(d):
        m = json.loads((d / contract.MANIFEST).read_text())
        m[key] = value
        (d / contract.MANIFEST).write_text(json.dumps(m))
    return fn


def _escape(d):
    m = json.loads((d / contract.MANIFEST).read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0" * 64}
    (d / contract.MANIFEST).write_text(json.dumps(m))


def _template(d):
    """A consistent bundle (fingerprint recomputed) whose author planted a sandbox escape."""
    from cortex_edge.runtime.bundle import fingerprint

    m = json.loads((d / contract.MANIFEST).read_text())
    m["tokenizer"]["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    m["fingerprint"] = fingerprint(m["files"], m["model"]["config"], m["weights"], m["state"], m["tokenizer"])
    (d / contract.MANIFEST).write_text(json.dumps(m))


def _config(d):
    m = json.loads((d / contract.MANIFEST).read_text())
    m["model"]["config"]["window"] = 4096
    (d / contract.MANIFEST).write_text(json.dumps(m))


def _truncate(d):
    p = d / contract.GRAPH
    p.write_bytes(p.read_bytes()[:1000])


def _tamper(d):
    p = d / contract.GRAPH
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


BAD_BUNDLES = {
    "missing file": (lambda d: (d / contract.TOKENIZER).unlink(), "missing"),
    "truncated file": (_truncate, "truncated"),
    "tampered file": (_tamper, "checksum"),
    "wrong contract version": (_set_manifest("contract_version", 999), "contract version"),
    "unknown quantization": (_set_manifest("weights", "int3"), "quantization"),
    "path outside the bundle": (_escape, "escapes"),
    "manifest not json": (lambda d: (d / contract.MANIFEST).write_text("{nope"), "JSON"),
    "template escapes sandbox": (_template, "template"),
    "config edited": (_config, "fingerprint"),
}


@pytest.mark.aarch64
@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundle_one_line_error(case, bundle_copy, tmp_path):
    fn, word = BAD_BUNDLES[case]
    d = _mutated(tmp_path, bundle_copy, fn)
    r = cli("chat", d, "--prompt", "hi", "--no-session", "--max-new-tokens", "4", env_home=tmp_path)
    line = one_line_error(r)
    assert word.lower() in line.lower(), line


@pytest.mark.aarch64
def test_bad_bundle_paths(tmp_path):
    one_line_error(cli("info", tmp_path / "nope"))
    one_line_error(cli("info", tmp_path))  # a folder without a manifest


BAD_ARGS = [
    (["--max-new-tokens", "-3"], "max-new-tokens"),
    (["--temperature", "-0.5"], "temperature"),
    (["--threads", "0"], "threads"),
    (["--top-p", "0"], "top-p"),
    (["--session", "../evil"], "session name"),
]


@pytest.mark.aarch64
@pytest.mark.parametrize("extra,word", BAD_ARGS)
def test_bad_cli_values(extra, word, bundle_copy, tmp_path):
    line = one_line_error(cli("chat", bundle_copy, "--prompt", "hi", *extra, env_home=tmp_path))
    assert word in line.lower()


@pytest.mark.aarch64
@pytest.mark.parametrize("prompt,word", [("", "empty"), ("   \n\t ", "empty"), ("\x01\x02\x1b", "empty"),
                                         ("bad \udcff utf8", "utf-8")])
def test_bad_prompts(prompt, word, bundle_copy, tmp_path):
    home = tmp_path / "h"
    r = cli("chat", bundle_copy, "--prompt", "first", "--max-new-tokens", "3", env_home=home)
    assert r.returncode == 0, r.stderr
    before = (home / "sessions" / "default.cxs").read_bytes()
    args = [sys.executable, "-c", "import sys; from cortex_edge.cli import main; main(sys.argv[1:])", "chat",
            str(bundle_copy), "--prompt", prompt]
    import os

    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "CORTEX_EDGE_HOME": str(home)},
                       timeout=120, errors="surrogateescape")
    assert word in one_line_error(r).lower()
    assert (home / "sessions" / "default.cxs").read_bytes() == before  # nothing lost


@pytest.mark.aarch64
def test_control_characters_are_dropped_not_fatal(bundle_copy, tmp_path):
    r = cli("chat", bundle_copy, "--prompt", "he\x07llo\x1b[2J", "--max-new-tokens", "3", "--no-session")
    assert r.returncode == 0, r.stderr


@pytest.mark.aarch64
def test_bad_bench_context(bundle_copy):
    line = one_line_error(cli("bench", bundle_copy, "--context", "12,abc"))
    assert "12,abc" in line


@pytest.mark.aarch64
def test_repl_reset_stats_quit(bundle_copy, tmp_path):
    r = cli("chat", bundle_copy, "--max-new-tokens", "3", "--seed", "1", env_home=tmp_path,
            input="hello\n/stats\n/reset\n/stats json\n/help\n/nonsense\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("remembered   ") == 1 and "0 tokens in 0 turns" not in r.stderr.split("(memory cleared)")[0]
    assert '"tokens_remembered": 0' in r.stderr  # after /reset, as JSON
    assert "/reset   forget everything" in r.stderr  # /help is answered locally
    assert "unknown command /nonsense" in r.stderr
    assert r.stdout.count("\n") <= 2  # only the one answer reached the model


@pytest.mark.aarch64
def test_onnx_external_data_outside_the_bundle(bundle_copy, tmp_path):
    """A consistent bundle (checksums, fingerprint) whose graph points its weights at ../outside.bin."""
    pytest.importorskip("onnx")
    import hashlib

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from cortex_edge.runtime.bundle import fingerprint

    d = tmp_path / "b"
    shutil.copytree(bundle_copy, d)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    t = numpy_helper.from_array(np.zeros((2,), np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", "8")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    data = m.SerializeToString()
    (d / contract.GRAPH).write_bytes(data)
    man = json.loads((d / contract.MANIFEST).read_text())
    man["files"][contract.GRAPH] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    man["fingerprint"] = fingerprint(man["files"], man["model"]["config"], man["weights"], man["state"], man["tokenizer"])
    (d / contract.MANIFEST).write_text(json.dumps(man))
    line = one_line_error(cli("chat", d, "--prompt", "hi", "--no-session", env_home=tmp_path))
    assert "external data" in line


@pytest.mark.aarch64
def test_sessions_list_show_rm(bundle_copy, tmp_path):
    for name in ("alpha", "beta"):
        r = cli("chat", bundle_copy, "--session", name, "--prompt", "hi", "--max-new-tokens", "2", env_home=tmp_path)
        assert r.returncode == 0, r.stderr
    r = cli("sessions", "list", env_home=tmp_path)
    assert r.returncode == 0 and "alpha" in r.stdout and "beta" in r.stdout and "1 turns" in r.stdout, r.stdout
    r = cli("sessions", "show", "alpha", env_home=tmp_path)
    assert r.returncode == 0 and "memory events" in r.stdout
    r = cli("sessions", "rm", "alpha", env_home=tmp_path)
    assert r.returncode == 0 and not (tmp_path / "sessions" / "alpha.cxs").exists()
    assert "alpha" not in cli("sessions", "list", env_home=tmp_path).stdout
    assert "no session named alpha" in one_line_error(cli("sessions", "rm", "alpha", env_home=tmp_path))
    assert "invalid session name" in one_line_error(cli("sessions", "show", "../x", env_home=tmp_path))
