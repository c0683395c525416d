"""`cortex-edge train`: teach the CMS sidecar pass-key recall, with the stable recipe (or the naive one).

Training runs the model exactly the way the runtime will (TorchStream: the ring, a memory event
every C tokens, a read every token) and backpropagates through the memory across all the events
of a sequence. The batch mixes two tasks:

  pass key   filler haystack + "The pass key is 71432. ..." at a random depth + question + " 71432."
             (runtime/niah.py's generator, training seeds only: < niah.HELD_OUT_SEED); loss on the answer
  language   byte windows of the first 90 % of Genesis (KJV, cortex_edge/model/data); loss on every byte

Schedule: a curriculum (short haystacks where the key can be copied from the window, then needles out of
the attention's reach), then a long stage (1,024-token haystacks, a stronger gate cost) from the EMA
weights. A training-only linear probe reads the key's digits from the memory read (deep supervision);
it is not part of the model and is not exported.

Recipes (cortexgpt-stability-solutions.md, applied to this model):

  stable   residual read gate with temperature (h + γ·W_o c), RMSNorm around the read, learned decay,
           fixed-interval consolidation (write_every), soft sparsity (an L1 cost on the write gates, no
           hard top-k), separate AdamW + gradient clipping for memory and backbone, EMA of the weights
  naive    CortexGPT's design: plain softmax gate over current / short / long memory (no residual, no
           norm, no temperature), random 10 % consolidation, hard top-5 % addressing, no decay; one
           AdamW, one global clip. Training-only: it has no export path.

What this leaves out: the model (lm.py, cms.py), the export (export/), the evaluation (runtime/niah.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cortex_edge.config import ModelConfig, recall_config
from cortex_edge.model.cms import CMSReader, CMSWriter
from cortex_edge.model.lm import CortexLM, TorchStream, build
from cortex_edge.runtime import niah

TEXT = Path(__file__).parent / "data" / "genesis_kjv.txt"
CHECKPOINT_FORMAT = "cortex-edge-checkpoint"
ANSWER = " {key}."  # what follows niah.QUESTION


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = "stable"  # stable | naive
    steps: int = 2000  # optimizer steps
    batch: int = 16  # sequences per step
    # curriculum: (end of the stage as a fraction of the steps, sequence lengths drawn from, pass-key share,
    # share of pass-key batches whose needle lies beyond the attention's reach). From scratch, copying
    # the key is learnt on short haystacks first, where the needle is mostly inside the window (at 256+
    # tokens nothing was learnt in 450 steps; at 128, 0.94 exact in 500); then the needle moves out of reach.
    # (Every length of 256..448 here and 960..1088 in the long stage instead, so that every phase of the filler
    # before the question is seen, was measured worse: filler events learnt a decay of 0.002 and recall at
    # 16k-64k fell to 0.15-0.20, against 1.00 with these lengths.)
    stages: tuple = ((0.3, (128,), 1.0, 0.0), (1.0, (256, 320, 448), 0.85, 0.7))
    lr: float = 3e-3  # backbone AdamW learning rate (peak; cosine decay after warm-up)
    memory_lr: float = 3e-3  # stable: the memory's own AdamW
    warmup: int = 50  # linear warm-up steps
    clip: float = 1.0  # backbone gradient clip (naive: the one global clip)
    memory_clip: float = 0.5  # stable: memory gradient clip
    ema: float = 0.99  # stable: EMA decay of the weights that get exported
    gate_l1: float = 0.05  # stable: soft sparsity, a cost on the write gates: mean(g) in the curriculum
    gate_cost: str = "l1"  # l1: mean(g) | sqrt: mean(sqrt(g)), whose push on a gate's logit fades as sqrt(g), not
    #                        as g, so gates on filler keep closing (the long stage uses it: at 64k tokens a
    #                        level-0 slot is rewritten 256 times, and g = 0.01 on filler ruins it). From the
    #                        start it also shut the needle's gates (recall 0.40 at 1k tokens, against 0.95).
    l1_start: float = 0.5  # the gate cost ramps in linearly from this fraction of training to 3/4 of it
    gate_init: float = 0.0  # stable: initial write-gate bias (sigmoid(0) = 0.5: memory usable from the start)
    read_gate_init: float = 2.0  # stable: initial read-gate bias (W_o = 0 keeps the start silent anyway)
    probe_weight: float = 1.0  # deep supervision: a training-only linear probe reads the 5 key digits from the
    #                            memory read c at the answer positions (not exported; both recipes get it)
    lm_weight: float = 0.1  # weight of the language-model loss against the answer loss
    seed: int = 0
    eval_every: int = 25  # steps between evaluations on a fixed batch
    init: str | None = None  # start from this checkpoint instead of the seed (a second, fine-tuning stage)
    long_batch_from: int = 512  # sequences longer than this get a proportionally smaller batch
    # the long stage, after the curriculum, from its (EMA) weights with fresh optimizers: haystacks long enough
    # that a needle's slot is rewritten by filler several times, and the sqrt gate cost. Measured (held-out,
    # int8 runtime, 20 samples): 4k-token recall 0.20 -> 0.80 and 16k ~0 -> 0.35 in 200 steps.
    long_steps: int = 200
    long_stages: tuple = ((1.0, (1024,), 0.85, 0.8),)
    long_lr: float = 1e-3
    long_gate_l1: float = 0.2
    # parameters (name prefixes) kept as they are (polish_config: level 0's decay head). Nothing in training punishes
    # a higher level-0 decay (the longest haystack is 64 events; (1 - 0.003)^64 keeps 83 % of a needle) but 16k-64k
    # tokens do ((1 - 0.003)^4096 keeps 0.0005 %). Measured on a 128-wide level 0 retrained with it learnt: its
    # filler decay went to 2.9e-3 and 64k recall to 0.23.
    frozen: tuple = ()
    # a margin cost on the answer, added to the loss at weight 1: mean(relu(margin - (logit of the right byte - the
    # best wrong one))) at the answer positions. Cross-entropy near 1.0 exact stops pushing; the held-out misses are
    # near-ties (the right digit second at 0.32-0.48), which this widens. 0: off.
    margin: float = 0.0

    def validate(self) -> None:
        if self.recipe not in ("stable", "naive"):
            raise ValueError(f"recipe must be stable or naive, got {self.recipe!r}")
        if self.gate_cost not in ("l1", "sqrt"):
            raise ValueError(f"gate_cost must be l1 or sqrt, got {self.gate_cost!r}")
        if self.steps < 1 or self.batch < 1 or not self.stages:
            raise ValueError("steps, batch and stages must be positive")

    def stage(self, step: int) -> tuple[tuple[int, ...], float, float]:
        for end, lengths, frac, far in self.stages:
            if step <= end * self.steps:
                return tuple(lengths), float(frac), float(far)
        return tuple(self.stages[-1][1]), float(self.stages[-1][2]), float(self.stages[-1][3])

    def batch_for(self, length: int) -> int:
        """Long sequences get a smaller batch (same tokens per step as `batch` x long_batch_from)."""
        return max(1, min(self.batch, self.batch * self.long_batch_from // length))


def polish_config(init: str, seed: int = 1, margin: float = 0.0, steps: int = 300) -> TrainConfig:
    """A polish of a `cortex-edge train` checkpoint: `steps` steps at a tenth of the curriculum's learning rate on
    320-1,024-token haystacks (mostly far needles), the sqrt gate cost; level 0's decay head stays as it is.
    margin > 0 adds the margin cost on the answer bytes.

    builtin:recall got two: 300 steps, seed 1, no margin (made before `frozen` existed), which took the last-digit
    misses from 8 in 500 to 2 in 500 (int8 runtime, held-out set A); then 600 steps, seed 3, margin 5, which took
    the misses on the fresh set B from 7 in 500 to 1 in 500 (README)."""
    return TrainConfig(init=init, seed=seed, steps=steps, stages=((1.0, (320, 448, 1024), 0.9, 0.8),), lr=3e-4,
                       memory_lr=3e-4, gate_l1=0.2, gate_cost="sqrt", l1_start=0.0, warmup=10, long_steps=0,
                       frozen=("cms_write.levels.0.decay.",), margin=margin)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------- data
def encode(text: str) -> list[int]:
    """The byte tokenizer of the builtin models (export/builtin.py): ids 3..258 are bytes 0..255."""
    return [3 + b for b in text.encode("utf-8")]


def lm_corpus(split: str = "train") -> np.ndarray:
    ids = np.array(encode(TEXT.read_text(encoding="utf-8")), dtype=np.int64)
    cut = int(0.9 * len(ids))
    return ids[:cut] if split == "train" else ids[cut:]


def passkey_row(length: int, seed: int, far: int = 0) -> tuple[list[int], list[float]]:
    """One training sample of exactly `length` tokens and its per-target loss weights (1 on the answer).
    far > 0: the needle ends at least `far` tokens before the question (out of the attention's reach)."""
    if seed >= niah.HELD_OUT_SEED:
        raise ValueError("training seeds must stay below the held-out evaluation seeds")
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10000, 100000)))
    ans = encode(ANSWER.format(key=key))
    max_depth = 1.0
    if far:
        n_fill = length - len(ans) - len(encode(niah.NEEDLE.format(key=key))) - len(encode(niah.QUESTION))
        max_depth = min(1.0, max(0.0, (n_fill - far) / n_fill))
    ids, _, _ = niah.make_sample(encode, length - len(ans), seed, key=key, max_depth=max_depth)
    if len(ids) + len(ans) != length:
        raise ValueError(f"a pass-key sample needs at least {len(ids) + len(ans)} tokens, got {length}")
    ids = ids + ans
    w = [0.0] * (length - len(ans)) + [1.0] * len(ans)  # weight of predicting ids[t] (from position t-1)
    return ids, w


def batch(rng: np.random.Generator, n: int, length: int, passkey_frac: float, corpus: np.ndarray, far: int = 0):
    """-> ids (n, L) int64, answer weights (n, L) float32, is_passkey (n,) bool"""
    ids = np.zeros((n, length), np.int64)
    w = np.zeros((n, length), np.float32)
    pk = np.zeros(n, bool)
    for i in range(n):
        if rng.random() < passkey_frac:
            row, wt = passkey_row(length, int(rng.integers(0, niah.HELD_OUT_SEED)), far)
            ids[i], w[i], pk[i] = row, wt, True
        else:
            at = int(rng.integers(0, len(corpus) - length))
            ids[i] = corpus[at:at + length]
    return torch.from_numpy(ids), torch.from_numpy(w), torch.from_numpy(pk)


# ---------------------------------------------------------------------------------------- the naive design
class NaiveReader(CMSReader):
    """h' = g₀ h + g₁ U₀c₀ + g₂ Σ_{l>0} U_l c_l,  g = softmax(W [h ‖ short ‖ long]): no residual, norm, temperature."""

    def __init__(self, dim, cfg, eps=1e-5):
        super().__init__(dim, cfg, eps)
        self.mix3 = nn.Linear(3 * dim, 3, bias=True)

    def forward(self, h, mems, keys, return_stats=False):
        ctx = self.read_levels(self.query(h), mems, keys)
        short = self.up[0](ctx[0])
        long = sum(self.up[i](ctx[i]) for i in range(1, len(ctx))) if len(ctx) > 1 else torch.zeros_like(h)
        g = torch.softmax(self.mix3(torch.cat([h, short, long], -1)), -1)  # (B, T, 3)
        h2 = g[..., 0:1] * h + g[..., 1:2] * short + g[..., 2:3] * long
        feat = self.compress(h)
        if return_stats:
            beta = g[..., 1:] / g[..., 1:].sum(-1, keepdim=True)  # share read from short / long
            return h2, feat, {"gate": 1.0 - g[..., 0:1], "beta": beta, "read": short + long}
        return h2, feat


class NaiveWriter(CMSWriter):
    """CMSWriter's event loop with no decay, hard top-5 % content addressing, and upper levels consolidated
    on a random 10 % of events."""

    def __init__(self, cfg, seed: int = 0):
        super().__init__(cfg)
        self.gen = torch.Generator().manual_seed(seed)

    def due(self, level, event):
        return level == 0 or torch.rand((), generator=self.gen).item() < 0.1

    def decay(self, head, z, g, level):
        return torch.zeros_like(g)

    def address(self, keys, usage, k):
        scores = torch.einsum("bnk,bk->bn", keys, k) / math.sqrt(self.cfg.key_dim)
        val, idx = scores.topk(max(1, math.ceil(0.05 * scores.shape[-1])), dim=-1)
        return torch.zeros_like(scores).scatter(-1, idx, torch.softmax(val, -1))


# ---------------------------------------------------------------------------------------- model
def new_model(cfg: ModelConfig, recipe: str, seed: int, gate_init: float = 0.0, read_gate_init: float = -1.0) -> CortexLM:
    model = build(cfg, seed).train()
    if recipe == "naive":
        model.cms_read = NaiveReader(cfg.dim, cfg.cms, cfg.norm_eps)
        model.cms_write = NaiveWriter(cfg.cms, seed)
        torch.manual_seed(seed)
        for m in (model.cms_read, model.cms_write):
            for p in m.parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))
        return model
    with torch.no_grad():  # the stable start: decay at its floor, write gate at gate_init
        for head in model.cms_write.levels:
            head.gate.bias.fill_(gate_init)
            head.decay.bias.fill_(-10.0)
        model.cms_read.gate.bias.fill_(read_gate_init)
    return model


def memory_params(model: nn.Module, frozen: tuple = ()) -> tuple[list, list]:
    """(backbone, memory) parameters to train; those named by a prefix in `frozen` are left out (and fixed)."""
    mem, main = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(tuple(frozen)))
        if not p.requires_grad:
            continue
        (mem if name.startswith("cms_") else main).append(p)
    return main, mem


def save_checkpoint(model: CortexLM, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(sd, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "config": json.dumps(model.cfg.to_dict()),
                                      "meta": json.dumps(meta)})
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[CortexLM, dict]:
    """A `cortex-edge train` checkpoint (safetensors, no pickle) -> eval-mode CortexLM, its metadata."""
    from safetensors import safe_open

    from cortex_edge.runtime.errors import CortexError

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != CHECKPOINT_FORMAT:
                raise CortexError(f"{path} is not a cortex-edge training checkpoint")
            cfg = ModelConfig.from_dict(json.loads(md["config"]))
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, KeyError) as e:
        raise CortexError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    model = CortexLM(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CortexError(f"checkpoint {path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), json.loads(md.get("meta", "{}"))


# ---------------------------------------------------------------------------------------- one step
def key_digits(ids: torch.Tensor, w_ans: torch.Tensor) -> torch.Tensor:
    """(B, 5) digits of each row's answer (-1 where the row has none)."""
    out = torch.full((ids.shape[0], 5), -1, dtype=torch.long)
    for i in range(ids.shape[0]):
        pos = torch.nonzero(w_ans[i] > 0).flatten()
        if len(pos):
            out[i] = ids[i, pos[1:6]] - 3 - ord("0")  # answer = " " + 5 digits + "."
    return out


def forward(model: CortexLM, ids: torch.Tensor, w_ans: torch.Tensor, stats: bool = False, probe=None,
            margin: float = 0.0) -> dict:
    """Run the stream over ids (B, L); losses and the stability metrics."""
    stream = TorchStream(model, batch=ids.shape[0])
    stream.read_log = [] if (stats or probe is not None) else None
    logits = stream.feed(ids)  # (B, L, V)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                         reduction="none").view(ids.shape[0], -1)  # (B, L-1) loss of predicting ids[:, t+1]
    wa = w_ans[:, 1:]
    ans = (ce * wa).sum() / wa.sum().clamp(min=1)
    lm_mask = 1.0 - wa
    lm = (ce * lm_mask).sum() / lm_mask.sum()
    pred_ok = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | (wa == 0)
    rows = wa.sum(1) > 0
    exact = pred_ok.all(1)[rows].float().mean() if rows.any() else torch.tensor(float("nan"))
    gates = [g for ev in stream.event_log for g in ev["gate"] if g is not None]
    g_all = torch.cat([g.reshape(-1) for g in gates]) if gates else torch.zeros(1)
    out = {"answer": ans, "lm": lm, "exact": exact, "write_gate": g_all.mean(), "stream": stream,
           "gate_cost": (g_all + 1e-8).sqrt().mean(), "write_gate_median": g_all.median(),
           "probe": torch.zeros(()), "margin": torch.zeros(())}
    if margin > 0 and rows.any():
        lg = logits[:, :-1][wa > 0]  # (A, V) logits that predict an answer byte
        tgt = ids[:, 1:][wa > 0]  # (A,)
        right = lg.gather(1, tgt[:, None])[:, 0]
        wrong = lg.scatter(1, tgt[:, None], float("-inf")).max(1).values
        out["margin"] = torch.relu(margin - (right - wrong)).mean()
    if probe is not None and rows.any():
        c = torch.cat([r["read"] for r in stream.read_log], dim=1)[:, :-1]  # (B, L-1, D) read before target t+1
        digits = key_digits(ids, w_ans)[rows]  # (R, 5)
        at = (wa[rows] > 0)  # (R, L-1): positions that predict the answer
        logits_p = probe(c[rows][at]).view(-1, 5, 10)  # (R*7, 5, 10)
        target = digits.repeat_interleave(at.sum(1), dim=0)  # (R*7, 5)
        out["probe"] = F.cross_entropy(logits_p.reshape(-1, 10), target.reshape(-1))
    return out


def grad_norm(params) -> float:
    g = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(g).norm()) if g else 0.0


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * (p + 1e-9).log()).sum(dim)


def metrics(out: dict, model: CortexLM) -> dict:
    st: TorchStream = out["stream"]
    m = {k: float(out[v].detach()) for k, v in (("answer_loss", "answer"), ("lm_loss", "lm"), ("answer_exact", "exact"),
                                                 ("write_gate_mean", "write_gate"), ("write_gate_median", "write_gate_median"))}
    if st.read_log:
        gam = torch.cat([r["gate"].detach().reshape(-1) for r in st.read_log]).clamp(1e-6, 1 - 1e-6)
        beta = torch.cat([r["beta"].detach().reshape(-1, r["beta"].shape[-1]) for r in st.read_log])
        m["read_gate_mean"] = float(gam.mean())
        m["read_gate_entropy"] = float(entropy(torch.stack([gam, 1 - gam], -1)).mean())
        m["level_read_share"] = [float(x) for x in beta.mean(0)]
        m["level_mix_entropy"] = float(entropy(beta).mean())
    norms = [float(x[0].detach().norm()) for x in st.mems]  # sample 0's ||M_l||_F after the last event
    m["memory_norm"] = norms
    cms = model.cfg.cms
    if isinstance(model.cms_write, NaiveWriter):
        m["memory_norm_bound"] = [float("inf")] * cms.levels  # no decay: unbounded
    else:
        w = model.cms_write.levels
        vmax = [float(torch.linalg.matrix_norm(h.value.weight.detach(), 2)) * math.sqrt(cms.event_dim) for h in w]
        floor = [cms.decay_min] * cms.levels if cms.adaptive_decay else cms.decay
        m["memory_norm_bound"] = [v / d for v, d in zip(vmax, floor)]
    return m


# ---------------------------------------------------------------------------------------- the loop
def train(tc: TrainConfig, cfg: ModelConfig | None = None, out: Path | None = None, progress=None,
          log=None) -> tuple[CortexLM, list[dict]]:
    """Train from a seed (or tc.init): the curriculum, then the long stage (tc.long_steps). Returns the model
    to export (EMA weights for the stable recipe) and the history of both."""
    tc.validate()
    cfg = cfg or recall_config()
    if tc.recipe == "naive":  # the naive design's only sparsity is its hard top-k: no sparse-write threshold
        cfg = dataclasses.replace(cfg, cms=dataclasses.replace(cfg.cms, write_threshold=0.0))
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    corpus = lm_corpus("train")
    if tc.init:  # same weights, the given config (which may change how the memory is stepped, not its shapes)
        model = CortexLM(cfg)
        try:
            model.load_state_dict(load_checkpoint(Path(tc.init))[0].state_dict())
        except RuntimeError:
            raise ValueError(f"{tc.init} holds weights of a different shape than the configuration") from None
        model.train()
    else:
        model = new_model(cfg, tc.recipe, tc.seed, tc.gate_init, tc.read_gate_init)
    probe = nn.Linear(cfg.dim, 50) if tc.probe_weight > 0 else None
    history: list[dict] = []
    t0 = time.perf_counter()
    model = _loop(model, tc, rng, corpus, probe, history, t0, log, progress)
    if tc.long_steps:
        long = dataclasses.replace(tc, steps=tc.long_steps, stages=tc.long_stages, lr=tc.long_lr,
                                   memory_lr=tc.long_lr, gate_l1=tc.long_gate_l1, gate_cost="sqrt", l1_start=0.0,
                                   warmup=10)
        model = _loop(model.train(), long, rng, corpus, probe, history, t0, log, progress)
    model.eval()
    if out is not None:
        save_checkpoint(model, out, {"train": dataclasses.asdict(tc), "steps": len(history),
                                     "seconds": round(time.perf_counter() - t0, 1),
                                     "final_eval": history[-1].get("eval")})
    return model, history


def _loop(model: CortexLM, tc: TrainConfig, rng, corpus, probe, history: list, t0: float, log, progress) -> CortexLM:
    """tc.steps optimizer steps over tc.stages; appends to history; returns the EMA model (stable) or the model."""
    cfg = model.cfg
    main, mem = memory_params(model, tc.frozen)
    if probe is not None:
        mem = mem + list(probe.parameters())
    stable = tc.recipe == "stable"
    if stable:
        opts = [torch.optim.AdamW(main, lr=tc.lr, weight_decay=0.01, betas=(0.9, 0.95)),
                torch.optim.AdamW(mem, lr=tc.memory_lr, weight_decay=0.001, betas=(0.9, 0.95))]
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tc.ema))
    else:
        opts = [torch.optim.AdamW(main + mem, lr=tc.lr, weight_decay=0.01, betas=(0.9, 0.95))]
        ema = None
    base = [o.param_groups[0]["lr"] for o in opts]
    eval_rng = np.random.default_rng(10_000 + tc.seed)  # a fixed evaluation batch, training seeds only
    eval_len = max(tc.stages[-1][1])
    eval_batch = batch(eval_rng, tc.batch_for(eval_len) * 2, eval_len, tc.stages[-1][2], corpus,
                       far=cfg.sinks + cfg.window + cfg.cms.chunk)  # recall from memory only
    step0 = len(history)
    for step in range(1, tc.steps + 1):
        frac = step / tc.warmup if step <= tc.warmup else \
            0.5 * (1 + math.cos(math.pi * (step - tc.warmup) / max(1, tc.steps - tc.warmup)))
        for o, b in zip(opts, base):
            for g in o.param_groups:
                g["lr"] = b * max(frac, 0.05)
        lengths, pk_frac, far_frac = tc.stage(step)
        length = int(lengths[rng.integers(0, len(lengths))])
        far = cfg.sinks + cfg.window + cfg.cms.chunk if rng.random() < far_frac else 0
        ids, w, _ = batch(rng, tc.batch_for(length), length, pk_frac, corpus, far)
        o = forward(model, ids, w, stats=True, probe=probe, margin=tc.margin)
        loss = o["answer"] + tc.lm_weight * o["lm"] + tc.probe_weight * o["probe"] + o["margin"]
        if stable:
            ramp = min(1.0, max(0.0, (step / tc.steps - tc.l1_start) / 0.25))
            loss = loss + ramp * tc.gate_l1 * (o["gate_cost"] if tc.gate_cost == "sqrt" else o["write_gate"])
        for op in opts:
            op.zero_grad(set_to_none=True)
        loss.backward()
        rec = {"step": step0 + step, "length": length, "loss": float(loss.detach()),
               "probe_loss": float(o["probe"].detach()), "margin_loss": float(o["margin"].detach()),
               "grad_norm_backbone": grad_norm(main),
               "grad_norm_memory": grad_norm(mem)}
        if stable:
            torch.nn.utils.clip_grad_norm_(main, tc.clip)
            torch.nn.utils.clip_grad_norm_(mem, tc.memory_clip)
        else:
            torch.nn.utils.clip_grad_norm_(main + mem, tc.clip)
        for op in opts:
            op.step()
        if ema is not None:
            ema.update_parameters(model)
        rec.update(metrics(o, model))
        if step % tc.eval_every == 0 or step == tc.steps:
            rec["eval"] = evaluate(ema.module if ema is not None else model, eval_batch, tc)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(rec)
        if log:
            log(rec)
        if progress:
            progress(rec)
    return ema.module if ema is not None else model


@torch.no_grad()
def evaluate(model: CortexLM, eval_batch, tc: TrainConfig) -> dict:
    was = model.training
    model.eval()
    ids, w, _ = eval_batch
    o = forward(model, ids, w)
    model.train(was)
    return {"loss": float(o["answer"] + tc.lm_weight * o["lm"]), "answer_loss": float(o["answer"]),
            "lm_loss": float(o["lm"]), "answer_exact": float(o["exact"])}


def oscillation(losses: list[float], window: int = 50, skip: float = 0.2) -> dict:
    """The oscillation ratio: max / min of the loss inside each sliding window of `window` steps, after
    skipping the first `skip` of training (the initial descent is not oscillation). Median and worst."""
    x = np.asarray(losses[int(skip * len(losses)):], dtype=np.float64)
    if len(x) < window:
        window = max(2, len(x))
    r = np.array([x[i:i + window].max() / max(x[i:i + window].min(), 1e-12) for i in range(len(x) - window + 1)])
    return {"window": window, "skip": skip, "median": float(np.median(r)), "worst": float(r.max())}
