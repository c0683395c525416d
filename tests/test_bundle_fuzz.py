"""Fuzz the manifest loader: whatever the manifest says, loading a bundle ends in the clean BundleError
or in a bundle that runs."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex_edge import contract
from cortex_edge.runtime.bundle import load_bundle
from cortex_edge.runtime.errors import BundleError
from tests.conftest import EMULATED

pytestmark = pytest.mark.aarch64
EXAMPLES = 60 if EMULATED else 2000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


@pytest.fixture(scope="module")
def fuzz_dir(request, tmp_path_factory):
    src = request.getfixturevalue("runtime_bundle")
    d = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(src, d)
    return d


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_manifest(fuzz_dir, data):
    from cortex_edge.runtime.engine import Engine

    original = json.loads((fuzz_dir / (contract.MANIFEST + ".orig")).read_text()) if (
        fuzz_dir / (contract.MANIFEST + ".orig")).exists() else None
    if original is None:
        original = json.loads((fuzz_dir / contract.MANIFEST).read_text())
        (fuzz_dir / (contract.MANIFEST + ".orig")).write_text(json.dumps(original))
    m = copy.deepcopy(original)
    paths = [p for p in _paths(m) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    raw = json.dumps(m).encode()
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    (fuzz_dir / contract.MANIFEST).write_bytes(raw)
    try:
        b = load_bundle(fuzz_dir)
    except BundleError:
        return
    eng = Engine(b, threads=1)  # a manifest that loads must describe a bundle that runs
    assert np.isfinite(eng.feed(eng.new_state(), [3, 4])).all()
