"""The device side runs with torch unimportable: runtime (the server too), quantize codecs and the CLI's
chat/bench/info/sessions."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, NoTorch())
""")


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=300)


def test_runtime_quantize_and_cli_import_without_torch():
    r = run_blocked("""
        import importlib.util
        import cortex_edge.runtime.engine, cortex_edge.runtime.cms, cortex_edge.runtime.session
        import cortex_edge.runtime.chat, cortex_edge.runtime.bench, cortex_edge.quantize.state_codec
        import cortex_edge.runtime.rows, cortex_edge.runtime.chat_memory, cortex_edge.runtime.memory_tasks
        if importlib.util.find_spec("starlette") is not None:  # the serve extra
            import cortex_edge.runtime.serve
        import cortex_edge.quantize.weights, cortex_edge.cli, cortex_edge.config, cortex_edge.contract
        try:
            import torch
        except ImportError:
            print("blocked")
        assert "torch" not in sys.modules
    """)
    assert r.returncode == 0, r.stderr
    assert "blocked" in r.stdout


def test_chat_bench_info_run_without_torch(bundle_int8, tmp_path):
    r = run_blocked(f"""
        import os, sys
        os.environ["CORTEX_EDGE_HOME"] = {str(tmp_path)!r}
        from cortex_edge.cli import main
        for argv in (["info", {str(bundle_int8)!r}],
                     ["chat", {str(bundle_int8)!r}, "--prompt", "hello", "--max-new-tokens", "8", "--seed", "1"],
                     ["bench", {str(bundle_int8)!r}, "--context", "0,64", "--new-tokens", "4", "--json",
                      {str(tmp_path / "b.json")!r}], ["sessions", "list"],
                     ["eval", "chat-memory", {str(bundle_int8)!r}, "--lengths", "64", "--samples", "1", "--json",
                      {str(tmp_path / "cm.json")!r}]):
            try:
                main(argv)
            except SystemExit as e:
                assert not e.code, (argv, e.code)
        assert "torch" not in sys.modules
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("OK")
    assert (tmp_path / "b.json").is_file()
    import json

    rep = json.loads((tmp_path / "cm.json").read_text())
    assert [r["condition"] for r in rep["rows"]] == ["in-window", "memory", "off"]
    assert (tmp_path / "sessions" / "default.cxs").is_file()


@pytest.mark.parametrize("argv", [["export", "builtin:tiny", "--out", "x"], ["chat", "--prompt", "hi"]])
def test_torch_needing_paths_fail_in_one_line_without_torch(argv, tmp_path):
    r = run_blocked(f"""
        import os
        os.environ["CORTEX_EDGE_HOME"] = {str(tmp_path)!r}
        from cortex_edge.cli import main
        main({argv!r})
    """)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "export" in lines[0], r.stderr
