"""Shared fixtures: tiny models built in-process from a seed, bundles exported once per session."""

from __future__ import annotations

import importlib.util
import os

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
# Under qemu (tools/run-aarch64.sh) floating point is 100-1000x slower: device-side tests shrink their
# workloads there (never their assertions).
EMULATED = os.environ.get("ARM_EMULATED") == "1"
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch (workstation extra); runtime-only run")


def pytest_addoption(parser):
    parser.addoption("--bundle", default=None, help="a prebuilt bundle, for runtime-only runs without torch (aarch64)")
    parser.addoption("--recall-bundle", default=None,
                     help="a prebuilt builtin:recall bundle (int8/int8), for runtime-only runs (aarch64)")
    parser.addoption("--kv8-bundle", default=None,
                     help="a prebuilt builtin:tiny bundle, fp32 weights and state, 8-bit attention cache (aarch64)")


@pytest.fixture(scope="session")
def tiny():
    from cortex_edge.export.builtin import builtin

    return builtin("builtin:tiny")


def _export(tmp_path_factory, tiny, weights, state):
    from cortex_edge.export.bundle_writer import write_bundle

    model, tok, meta = tiny
    out = tmp_path_factory.mktemp("bundles") / f"tiny-{weights}-{state}"
    write_bundle(model, tok, meta, out, weights=weights, state=state, source="builtin:tiny", quiet=True)
    return out


@pytest.fixture(scope="session")
def bundle_fp32(tmp_path_factory, tiny):
    return _export(tmp_path_factory, tiny, "fp32", "fp32")


@pytest.fixture(scope="session")
def bundle_int8(tmp_path_factory, tiny):
    return _export(tmp_path_factory, tiny, "int8", "int8")


@pytest.fixture(scope="session")
def runtime_bundle(request):
    """--bundle when given (runtime-only runs, e.g. emulated aarch64 without torch), else a fresh int8 export."""
    return request.config.getoption("--bundle", default=None) or request.getfixturevalue("bundle_int8")


@pytest.fixture(scope="session")
def recall_bundle(request, tmp_path_factory):
    """--recall-bundle when given, else builtin:recall (the trained checkpoint) exported to int8 / int8."""
    given = request.config.getoption("--recall-bundle", default=None)
    if given:
        return given
    if not HAS_TORCH:
        pytest.skip("needs --recall-bundle or torch to export builtin:recall")
    from cortex_edge.export.pipeline import export_model

    out = tmp_path_factory.mktemp("bundles") / "recall-int8-int8"
    export_model("builtin:recall", out, weights="int8", state="int8", quiet=True)
    return out


@pytest.fixture(scope="session")
def kv8_bundle(request, tmp_path_factory):
    """--kv8-bundle when given, else builtin:tiny exported with fp32 weights and state and an 8-bit attention cache
    (the cache's rounding is then the only rounding)."""
    given = request.config.getoption("--kv8-bundle", default=None)
    if given:
        return given
    if not HAS_TORCH:
        pytest.skip("needs --kv8-bundle or torch to export builtin:tiny")
    from cortex_edge.export.bundle_writer import write_bundle

    model, tok, meta = request.getfixturevalue("tiny")
    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32-fp32-kv8"
    write_bundle(model, tok, meta, out, weights="fp32", state="fp32", source="builtin:tiny", quiet=True, kv="int8")
    return out


@pytest.fixture(scope="module")
def engine(runtime_bundle):
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    return Engine(load_bundle(runtime_bundle), threads=1)
