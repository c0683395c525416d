"""The tiny bundle shipped in the package (for `cortex-edge selftest`) is exactly a fresh export, and
the self-test passes on this CPU (and on the emulated Cortex-A76)."""

from __future__ import annotations

import json

import pytest

from cortex_edge import contract
from tests.conftest import requires_torch


@requires_torch
def test_packaged_bundle_is_a_fresh_export(bundle_int8):
    from cortex_edge.runtime.selftest import PACKAGED

    fresh = json.loads((bundle_int8 / contract.MANIFEST).read_text())
    shipped = json.loads((PACKAGED / contract.MANIFEST).read_text())
    assert shipped["files"] == fresh["files"], "re-run: cortex-edge export builtin:tiny --out runtime/data/tiny --force"
    assert shipped["fingerprint"] == fresh["fingerprint"]


@pytest.mark.aarch64
def test_selftest_passes():
    from cortex_edge.runtime import selftest

    lines = []
    assert selftest.run(echo=lines.append), "\n".join(lines)
    assert lines[-1] == "selftest OK"
