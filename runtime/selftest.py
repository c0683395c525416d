"""`cortex-edge selftest`: prove numpy + onnxruntime + the jump map work on this CPU, without torch.

Runs the `builtin:tiny` bundle that ships inside the package (int8 weights, int8 state; kept
byte-identical to a fresh export by tests/test_selftest_bundle.py): checksums, chunk == token by
token through both graphs, every CMS level under its decay bound, a session save/load round trip.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import numpy as np

PACKAGED = Path(__file__).parent / "data" / "tiny"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("features", "flags")):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def run(bundle: Path = PACKAGED, threads: int = 1, echo=print) -> bool:
    from cortex_edge import contract
    from cortex_edge.runtime import cms, session
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    ok = True

    def check(name: str, cond: bool, detail: str = "") -> None:
        nonlocal ok
        ok &= bool(cond)
        echo(f"  [{'ok' if cond else 'FAIL'}] {name}{': ' + detail if detail else ''}")

    flags = cpu_flags()
    echo(f"cortex-edge selftest on {platform.machine()} ({platform.system()} {platform.release()})")
    if platform.machine() in ("aarch64", "arm64"):
        echo(f"  dot product (asimddp): {'asimddp' in flags}; fp16 (fphp): {'fphp' in flags}; "
             f"i8mm: {'i8mm' in flags}")
    import onnxruntime as ort

    echo(f"  numpy {np.__version__}, onnxruntime {ort.__version__}")
    b = load_bundle(bundle)
    check("bundle checksums and contract", True, str(bundle))
    eng = Engine(b, threads=threads)
    ids = np.random.default_rng(0).integers(3, b.config.vocab_size, 120)
    a, c = eng.new_state(), eng.new_state()
    la = eng.feed(a, ids, all_logits=True)
    t = time.perf_counter()
    lc = eng.feed(c, ids, max_piece=1, all_logits=True)
    per_tok = (time.perf_counter() - t) / ids.size
    diff = float(np.abs(la - lc).max()) / max(1.0, float(np.abs(la).max()))
    tol = contract.RTOL_PATHS[b.weights]
    agree = float(np.mean(la.argmax(-1) == lc.argmax(-1)))
    check("chunk path == token-by-token path", diff <= tol and agree >= 0.95 and a.events == c.events >= 3,
          f"max |dlogit| {diff:.1e} of scale (<= {tol:g} for {b.weights} weights), top-1 {agree:.3f}, "
          f"{ids.size} tokens, {a.events} memory events")
    vmax = cms.value_bound(eng.write_w, b.config.cms)
    d_min = [b.config.cms.decay_min if b.config.cms.adaptive_decay else d for d in b.config.cms.decay]
    norms = [float(np.linalg.norm(m)) for m, _ in a.views]
    check("CMS norms under their decay bounds", all(np.isfinite(n) and n <= v / d * 1.01 + 1e-3
                                                     for n, v, d in zip(norms, vmax, d_min)),
          ", ".join(f"L{i} {n:.2f}" for i, n in enumerate(norms)))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "s.cxs"
        session.save(p, eng, a)
        back, _, _ = session.load(p, eng)
        same = np.array_equal(eng.feed(back, [5]), eng.feed(a.copy(), [5]))
    check("session save/load round trip", same)
    echo(f"  decode {per_tok * 1e3:.2f} ms/token (tiny model, {threads} thread)")
    echo("selftest OK" if ok else "selftest FAILED")
    return ok
