"""Durable sessions: the whole runtime state in one safetensors file, replaced atomically, under a lock.

File: safetensors (no pickle) whose metadata holds a magic string, a format version, the bundle's
fingerprint and state format, counters, and a sha256 over all that metadata and every tensor
(safetensors has no checksum of its own).
Save: write a uniquely named temporary file, fsync, hard-link the current file to NAME.bak (only when
the current file is known good: a damaged one never replaces the backup), rename the temporary over
NAME, fsync the folder. At every instant NAME or NAME.bak holds a complete old or new version; load
falls back to the backup when the main file is missing or damaged. Any error removes the temporary.
Lock: one process at a time holds a session from its load to its last save (SessionFile), so two
turns on one session never race (filelock on NAME.lock).
Reads: only regular files, never more bytes than a session of the bundle can have.
What this leaves out: what a chat does with the state (chat.py).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np

from cortex_edge import contract
from cortex_edge.runtime.engine import Engine, State, StoredLevel
from cortex_edge.runtime.errors import SessionError
from cortex_edge.runtime.ring import chunk_start
from cortex_edge.runtime.rows import RowState

LOCK_WAIT_S = 600.0  # how long a second process waits for a session that another one holds

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # fullmatch: no trailing newline
HEADER_SLACK = 1 << 16


def sessions_dir() -> Path:
    base = os.environ.get("CORTEX_EDGE_HOME")
    if base:
        return Path(base) / "sessions"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "cortex-edge" / "sessions"


def session_path(name: str) -> Path:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SessionError(f"invalid session name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return sessions_dir() / (name + contract.SESSION_SUFFIX)


def _tensors(st: State, engine: Engine) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {"acc": st.acc}
    for i, (k, v) in enumerate(zip(st.keys, st.values)):  # the whole buffers (runtime/ring.py)
        t[f"kv.{i}.key"] = k
        t[f"kv.{i}.value"] = v
    c = engine.cfg
    t["sinks"] = st.sink_keys if st.sink_keys is not None else np.zeros(
        (c.n_layers, c.n_kv_heads, c.sinks, c.head_dim), np.float32)
    for lvl, s in enumerate(st.levels):
        for part, enc in (("mem", s.mem), ("keys", s.keys)):
            for k, a in enc.items():
                t[f"cms.{lvl}.{part}.{k}"] = a
        t[f"cms.{lvl}.usage"] = s.usage
    if st.rows is not None:
        r = st.rows
        for part, enc in (("keys", r.keys), ("values", r.values)):
            for k, a in enc.items():
                t[f"rows.{part}.{k}"] = a
        t["rows.usage"], t["rows.token"], t["rows.pending"] = r.usage, r.token, r.pending
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
    """Make a rename in d durable, where the file system allows (best effort: the rename itself has happened,
    so a failure here must not be reported as a failed save)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ForeignSessionError(SessionError):
    """The session file is sound but belongs to another bundle or runtime version."""


def _unique(path: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def save(path: Path, engine: Engine, st: State, extra: dict | None = None, backup: bool = True) -> None:
    """Replace the session at path with st. backup=False: the current file is damaged or foreign, so the
    backup is left as it is (it may be the only good copy). Raises SessionError, the previous version intact."""
    from safetensors.numpy import save

    t = _tensors(st, engine)
    meta = {"magic": contract.SESSION_MAGIC, "version": str(contract.SESSION_VERSION),
            "fingerprint": engine.bundle.fingerprint, "state_format": engine.state_format,
            "n": str(st.n), "events": str(st.events), "extra": json.dumps(extra or {})}
    meta["checksum"] = _checksum(t, meta)
    data = save(t, metadata=meta)
    made: list[Path] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unique(path, ".tmp")
        made.append(tmp)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if backup and os.path.lexists(path):
            bak_tmp = path.with_name(f"{path.name}.{os.getpid()}.bak.tmp")
            made.append(bak_tmp)
            if os.path.lexists(bak_tmp):
                os.unlink(bak_tmp)
            os.link(path, bak_tmp)
            os.replace(bak_tmp, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise SessionError(f"cannot save session {path.name}: {e.strerror or e} (the previous version is "
                           "kept)") from None
    finally:
        for m in made:
            try:
                if os.path.lexists(m):
                    os.unlink(m)
            except OSError:
                pass


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
        raise ForeignSessionError(f"session file version {meta.get('version')!r} was made by another version "
                                  "of cortex-edge")
    if meta.get("fingerprint") != engine.bundle.fingerprint or meta.get("state_format") != engine.state_format:
        raise ForeignSessionError("session was made with another bundle (model, weights or state format differ)")
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
    if cfg.cms.rows:
        token = np.array(t["rows.token"])
        if np.any(token >= n) or np.any(token < -1):
            raise SessionError("session file rows are inconsistent with its counters")
        st.rows = RowState(keys={k.split(".")[-1]: np.array(t[k]) for k in sorted(t) if k.startswith("rows.keys.")},
                           values={k.split(".")[-1]: np.array(t[k]) for k in sorted(t) if k.startswith("rows.values.")},
                           usage=np.array(t["rows.usage"]), token=token, pending=np.array(t["rows.pending"]))
    st.keys = [np.array(a) for a in st.keys]  # writable copies
    st.values = [np.array(a) for a in st.values]
    st.prepared = chunk_start(n - 1, chunk) if n else -1  # the layout the last piece ran in (ring.py)
    st.sink_keys = np.array(t["sinks"]) if st.prepared >= cfg.sinks else None
    st.placed = None  # the sinks and rows may be rotated for a decode step: written again before the next one
    used = st.used(engine.lay)
    if any(np.any(a[:, :, used:]) for a in st.keys + st.values):
        raise SessionError("session file buffers hold tokens its counters say it has not seen")
    engine.refresh_views(st)
    return st, extra


def _read_bounded(p: Path, limit: int) -> bytes | None:
    """The bytes of p if it is a regular file of at most limit bytes; None if it does not exist."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SessionError(f"cannot read: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SessionError("not a regular file")
        if info.st_size > limit:
            raise SessionError("larger than any session of this bundle can be")
        chunks, left = [], limit + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 22))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > limit:
            raise SessionError("larger than any session of this bundle can be")
        return data
    except OSError as e:
        raise SessionError(f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)


def load(path: Path, engine: Engine) -> tuple[State, dict, str]:
    """-> (state, extra, which) with which in {"main", "backup"}. Raises FileNotFoundError if neither file
    exists, ForeignSessionError if they belong to another bundle, SessionError if neither loads."""
    expect = _tensors(engine.new_state(), engine)
    limit = sum(a.nbytes for a in expect.values()) + HEADER_SLACK + 8
    errors: list[tuple[str, SessionError]] = []
    for which, p in (("main", path), ("backup", path.with_name(path.name + ".bak"))):
        try:
            data = _read_bounded(p, limit)
            if data is None:
                continue
            st, extra = _parse(data, engine, expect)
            return st, extra, which
        except SessionError as e:
            errors.append((p.name, e))
    if not errors:
        raise FileNotFoundError(path)
    if all(isinstance(e, ForeignSessionError) for _, e in errors):
        raise ForeignSessionError(str(errors[0][1]))
    raise SessionError("cannot load session: " + "; ".join(f"{n}: {e}" for n, e in errors))


def describe(path: Path) -> dict:
    """What a session file says about itself, from its header alone (no tensors read, nothing verified)."""
    info = {"name": path.name[:-len(contract.SESSION_SUFFIX)], "bytes": path.stat().st_size,
            "modified": path.stat().st_mtime, "backup": path.with_name(path.name + ".bak").is_file()}
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > HEADER_SLACK:
                raise ValueError
            meta = json.loads(f.read(hlen)).get("__metadata__") or {}
        extra = json.loads(meta.get("extra", "{}"))
        info.update(tokens=int(meta["n"]), events=int(meta["events"]), turns=int(extra.get("turns", 0)),
                    fingerprint=str(meta["fingerprint"]), version=meta.get("version"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        info["damaged"] = True
    return info


def remove(path: Path) -> list[str]:
    """Delete a session (main, backup, lock) while holding its lock; the names removed."""
    with SessionFile(path, wait_s=1.0):
        gone = []
        for p in (path, path.with_name(path.name + ".bak")):
            if os.path.lexists(p):
                os.unlink(p)
                gone.append(p.name)
    lock = path.with_name(path.name + ".lock")
    if os.path.lexists(lock):
        os.unlink(lock)
    return gone


def turns(extra: dict) -> int:
    """The turn count a session's extra metadata holds (0 when absent or not an integer)."""
    t = extra.get("turns", 0)
    return t if isinstance(t, int) and not isinstance(t, bool) else 0


class SessionFile:
    """A named session held by this process from open() to close(): load once, save after each turn.

    The lock is taken before the load, so the state a turn starts from is the last one committed; a second
    process on the same session waits for it (up to wait_s, with a note on stderr) or gets a clear error.
    """

    def __init__(self, path: Path, wait_s: float = LOCK_WAIT_S, on_wait=None):
        from filelock import FileLock, Timeout

        self.path = path
        self.main_ok = False  # the main file is a good version of this bundle's session (may be backed up)
        self._lock = FileLock(str(path) + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._lock.acquire(timeout=min(1.0, wait_s))
            except Timeout:
                if on_wait is not None:
                    on_wait()
                self._lock.acquire(timeout=max(0.0, wait_s - 1.0))
        except Timeout:
            raise SessionError(f"session {path.stem} is in use by another cortex-edge process "
                               f"(waited {wait_s:.0f} s)") from None
        except OSError as e:
            raise SessionError(f"cannot lock session {path.stem}: {e.strerror or e}") from None
        for stale in path.parent.glob(glob.escape(path.name) + ".*.tmp"):  # left by a crash; ours alone now
            try:
                stale.unlink()
            except OSError:
                pass

    def load(self, engine: Engine) -> tuple[State, dict, str]:
        st, extra, which = load(self.path, engine)
        self.main_ok = which == "main"
        return st, extra, which

    def save(self, engine: Engine, st: State, extra: dict | None = None) -> None:
        save(self.path, engine, st, extra, backup=self.main_ok)
        self.main_ok = True

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> SessionFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
