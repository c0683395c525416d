"""Durable sessions: the whole runtime state in one safetensors file, replaced atomically.

File: safetensors (no pickle) whose metadata holds a magic string, a format version, the bundle's
fingerprint and state format, counters, and a sha256 over all that metadata and every tensor
(safetensors has no checksum of its own).
Save: write NAME.tmp, fsync, hard-link the current file to NAME.bak, rename NAME.tmp over NAME,
fsync the folder. At every instant NAME or NAME.bak holds a complete old or new version; load
falls back to the backup when the main file is missing or damaged.
What this leaves out: what a chat does with the state (chat.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from cortex_edge import contract
from cortex_edge.runtime.engine import Engine, State, StoredLevel
from cortex_edge.runtime.errors import SessionError

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
HEADER_SLACK = 1 << 16


def sessions_dir() -> Path:
    base = os.environ.get("CORTEX_EDGE_HOME")
    if base:
        return Path(base) / "sessions"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "cortex-edge" / "sessions"


def session_path(name: str) -> Path:
    if not NAME_RE.match(name or ""):
        raise SessionError(f"invalid session name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return sessions_dir() / (name + contract.SESSION_SUFFIX)


def _tensors(st: State, engine: Engine) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {"acc": st.acc}
    for i, (k, v) in enumerate(zip(*engine.full_ring(st))):  # S + W slots on disk, however far the ring filled
        t[f"kv.{i}.key"] = k
        t[f"kv.{i}.value"] = v
    for lvl, s in enumerate(st.levels):
        for part, enc in (("mem", s.mem), ("keys", s.keys)):
            for k, a in enc.items():
                t[f"cms.{lvl}.{part}.{k}"] = a
        t[f"cms.{lvl}.usage"] = s.usage
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


def _checksum(t: dict[str, np.ndarray], meta: dict[str, str]) -> str:
    """sha256 over every metadata field but the checksum itself, then every tensor."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for k in sorted(t):
        a = t[k]
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: Path, engine: Engine, st: State, extra: dict | None = None) -> None:
    from safetensors.numpy import save

    t = _tensors(st, engine)
    meta = {"magic": contract.SESSION_MAGIC, "version": str(contract.SESSION_VERSION),
            "fingerprint": engine.bundle.fingerprint, "state_format": engine.state_format,
            "n": str(st.n), "events": str(st.events), "extra": json.dumps(extra or {})}
    meta["checksum"] = _checksum(t, meta)
    data = save(t, metadata=meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        bak_tmp = path.with_name(path.name + ".bak.tmp")
        if bak_tmp.exists():
            bak_tmp.unlink()
        os.link(path, bak_tmp)
        os.replace(bak_tmp, path.with_name(path.name + ".bak"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _parse(data: bytes, engine: Engine, expect: dict[str, np.ndarray]) -> tuple[State, dict]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(data) < 8:
        raise SessionError("session file is truncated")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > min(len(data) - 8, HEADER_SLACK):
        raise SessionError("session file header claims an impossible size (truncated or corrupt)")
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
        meta = header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise SessionError("session file header is corrupt") from None
    if not isinstance(meta, dict) or meta.get("magic") != contract.SESSION_MAGIC:
        raise SessionError("not a cortex-edge session file")
    if meta.get("version") != str(contract.SESSION_VERSION):
        raise SessionError(f"session file version {meta.get('version')!r} is not supported")
    if meta.get("fingerprint") != engine.bundle.fingerprint:
        raise SessionError("session was made with another bundle (model, weights or state format differ); "
                           "use another --session name or /reset")
    if meta.get("state_format") != engine.state_format:
        raise SessionError("session state format does not match the bundle")
    try:
        t = load(data)
    except (SafetensorError, ValueError, TypeError):
        raise SessionError("session file is corrupt (tensor data unreadable)") from None
    if set(t) != set(expect):
        raise SessionError("session file does not hold this bundle's state tensors")
    for k, a in expect.items():
        if t[k].dtype != a.dtype or t[k].shape != a.shape:
            raise SessionError(f"session tensor {k} has the wrong shape or type")
    if not all(isinstance(v, str) for v in meta.values()) or _checksum(t, meta) != meta.get("checksum"):
        raise SessionError("session file checksum mismatch (corrupted)")
    try:
        n, events = int(meta["n"]), int(meta["events"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, json.JSONDecodeError):
        raise SessionError("session file counters are corrupt") from None
    chunk = engine.cfg.cms.chunk
    if n < 0 or events != n // chunk or not isinstance(extra, dict):
        raise SessionError("session file counters are inconsistent")
    if not all(np.all(np.isfinite(a)) for a in t.values() if a.dtype.kind == "f"):
        raise SessionError("session file holds non-finite values")
    cfg = engine.cfg
    st = State(keys=[t[f"kv.{i}.key"] for i in range(cfg.n_layers)],
               values=[t[f"kv.{i}.value"] for i in range(cfg.n_layers)],
               levels=[StoredLevel(mem={k.split(".")[-1]: t[k] for k in sorted(t) if k.startswith(f"cms.{lvl}.mem.")},
                                   keys={k.split(".")[-1]: t[k] for k in sorted(t) if k.startswith(f"cms.{lvl}.keys.")},
                                   usage=t[f"cms.{lvl}.usage"]) for lvl in range(cfg.cms.levels)],
               acc=t["acc"], n=n, events=events)
    st.keys = [np.array(a) for a in st.keys]  # writable copies
    st.values = [np.array(a) for a in st.values]
    try:
        engine.fit_ring(st)  # as many slots as this graph reads after n tokens
    except ValueError:
        raise SessionError("session file ring holds tokens its counters say it has not seen") from None
    engine.refresh_views(st)
    return st, extra


def load(path: Path, engine: Engine) -> tuple[State, dict, str]:
    """-> (state, extra, which) with which in {"main", "backup"}. Raises SessionError if neither loads."""
    expect = _tensors(engine.new_state(), engine)
    limit = sum(a.nbytes for a in expect.values()) + HEADER_SLACK + 8
    errors = []
    for which, p in (("main", path), ("backup", path.with_name(path.name + ".bak"))):
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            continue
        if size > limit:
            errors.append(f"{p.name}: larger than any session of this bundle can be")
            continue
        try:
            st, extra = _parse(p.read_bytes(), engine, expect)
            return st, extra, which
        except SessionError as e:
            errors.append(f"{p.name}: {e}")
    if not errors:
        raise FileNotFoundError(path)
    raise SessionError("cannot load session: " + "; ".join(errors))
