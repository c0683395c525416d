"""Durable sessions: round trip, atomic replace with a backup, refusal of foreign or damaged files,
a SIGKILL storm during saves, and a fuzzer that only ever sees the clean error."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex_edge.runtime import session as sess
from cortex_edge.runtime.errors import SessionError
from tests.conftest import EMULATED

pytestmark = pytest.mark.aarch64


@pytest.fixture(scope="module")
def fed(engine):
    st_ = engine.new_state()
    engine.feed(st_, np.random.default_rng(0).integers(3, engine.cfg.vocab_size, 77))
    return st_


def _same(a, b):
    assert a.n == b.n and a.events == b.events
    for x, y in zip(a.keys + a.values + [a.acc], b.keys + b.values + [b.acc]):
        np.testing.assert_array_equal(x, y)
    for la, lb in zip(a.levels, b.levels):
        for k in la.mem:
            np.testing.assert_array_equal(la.mem[k], lb.mem[k])
            np.testing.assert_array_equal(la.keys[k], lb.keys[k])
        np.testing.assert_array_equal(la.usage, lb.usage)


def test_round_trip_is_exact_and_continues_identically(engine, fed, tmp_path):
    p = tmp_path / "s.cxs"
    sess.save(p, engine, fed, {"turns": 3})
    back, extra, which = sess.load(p, engine)
    assert which == "main" and extra == {"turns": 3}
    _same(fed, back)
    a, b = fed.copy(), back
    np.testing.assert_array_equal(engine.feed(a, [5, 6, 7]), engine.feed(b, [5, 6, 7]))


def test_previous_version_kept_and_used_when_main_is_damaged(engine, fed, tmp_path):
    p = tmp_path / "s.cxs"
    old = engine.new_state()
    sess.save(p, engine, old)
    sess.save(p, engine, fed)
    assert p.with_name("s.cxs.bak").is_file()
    data = bytearray(p.read_bytes())
    data[-10] ^= 0x40  # flip a bit in the tensor data
    p.write_bytes(bytes(data))
    back, _, which = sess.load(p, engine)
    assert which == "backup"
    _same(old, back)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "header_size", "empty", "garbage"])
def test_damaged_session_is_refused_cleanly(engine, fed, tmp_path, damage):
    p = tmp_path / "s.cxs"
    sess.save(p, engine, fed)
    data = bytearray(p.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bitflip":
        data[len(data) - 100] ^= 1
    elif damage == "header_size":
        data[:8] = (10**15).to_bytes(8, "little")
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(os.urandom(len(data)))
    p.write_bytes(bytes(data))
    with pytest.raises(SessionError):
        sess.load(p, engine)


def _rewrite_meta(p, edit) -> None:
    """Rewrite a session file's metadata with edit(meta), tensors untouched, checksum not recomputed."""
    import json
    import struct

    from safetensors.numpy import load, save

    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    edit(meta)
    p.write_bytes(save(load(raw), metadata=meta))


def test_session_from_another_bundle_is_refused(engine, fed, tmp_path):
    p = tmp_path / "s.cxs"
    sess.save(p, engine, fed)
    _rewrite_meta(p, lambda m: m.update(fingerprint="0" * 32))
    with pytest.raises(SessionError, match="another bundle"):
        sess.load(p, engine)


def test_absurdly_large_session_file_is_not_read(engine, tmp_path):
    p = tmp_path / "s.cxs"
    with open(p, "wb") as f:
        f.truncate(1 << 33)  # sparse: claims 8 GiB without using disk
    with pytest.raises(SessionError, match="larger than"):
        sess.load(p, engine)


def test_bad_session_names():
    for bad in ["", "../x", "a/b", ".hidden", "x" * 65, "a\x00b"]:
        with pytest.raises(SessionError):
            sess.session_path(bad)


@settings(max_examples=100 if EMULATED else 2000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_session_loader(engine, fed, tmp_path_factory, data):
    base = tmp_path_factory.getbasetemp() / "fuzz-src.cxs"
    if not base.exists():
        sess.save(base, engine, fed)
    raw = bytearray(base.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "splice", "random"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(max_size=64))
    else:
        raw = bytearray(data.draw(st.binary(max_size=4096)))
    p = tmp_path_factory.getbasetemp() / "fuzz.cxs"
    p.write_bytes(bytes(raw))
    try:
        back, _, _ = sess.load(p, engine)
    except SessionError:
        return
    _same(fed, back)  # only a harmless change (e.g. JSON whitespace) may load, and then it is the same state


KILLER_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine
    from cortex_edge.runtime import session as sess
    from pathlib import Path
    eng = Engine(load_bundle(sys.argv[1]), threads=1)
    st = eng.new_state()
    eng.feed(st, np.arange(3, 40))
    p = Path(sys.argv[2])
    v = int(sys.argv[3])
    print("ready", flush=True)
    while True:
        v += 1
        st.acc[:] = v
        sess.save(p, eng, st, {"version": v})
        print(v, flush=True)
""")


@pytest.mark.aarch64
def test_sigkill_during_saves_never_loses_the_session(engine, tmp_path):
    """At least 200 SIGKILLs at random moments of repeated saves: every time the session loads, as the
    version last reported saved or the one in flight, never corrupt, never lost."""
    kills = int(os.environ.get("CORTEX_EDGE_KILLS", "200"))
    p = tmp_path / "k.cxs"
    rng = random.Random(0)
    done = 0
    backups = 0
    for _ in range(kills):
        child = subprocess.Popen([sys.executable, "-c", KILLER_CHILD, str(engine.bundle.path), str(p), str(done)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        t0 = time.perf_counter()
        first = child.stdout.readline().strip()  # one save done: its duration sets the kill window
        time.sleep(rng.uniform(0, 4 * (time.perf_counter() - t0)))
        child.send_signal(signal.SIGKILL)
        out = [first] + child.communicate()[0].split()
        child.wait()
        saved = [int(x) for x in out if x.isdigit()]
        last = saved[-1] if saved else done
        st_, extra, which = sess.load(p, engine)
        v = extra["version"]
        assert v in (last, last + 1), (v, last)
        assert float(st_.acc[0]) == v
        backups += which == "backup"
        done = v
    assert done > 0


def test_edited_counters_are_refused(engine, fed, tmp_path):
    """Found by the fuzzer: a bit flip turning n=67 into n=77 kept events consistent and loaded."""
    p = tmp_path / "s.cxs"
    sess.save(p, engine, fed)
    _rewrite_meta(p, lambda m: m.update(n=str(int(m["n"]) + 1)))  # same number of events
    with pytest.raises(SessionError, match="checksum"):
        sess.load(p, engine)
