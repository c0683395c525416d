"""Model and memory configuration: frozen dataclasses, one comment per field.

Stdlib only: the runtime on the Pi reads these from a bundle's manifest without torch.
What this leaves out: how weights are made (cortex_edge.model) or stored (export, quantize).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROW_PLACES = ("slot", "recency")
ADDRESSING_MODES = ("content", "lru", "hybrid")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # the MLP's gate activation: SiLU (Llama), exact or tanh GELU
MAX_SIZE = 1 << 20  # no dimension of a model this runtime runs is larger


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


@dataclass(frozen=True)
class CMSConfig:
    """The continuous memory system (CMS): L+1 levels, written at event times, read every token."""

    slots: tuple[int, ...] = (64, 128, 256)  # N_l: memory slots per level, fastest level first
    widths: tuple[int, ...] = (128, 256, 512)  # d_l: value width per level
    key_dim: int = 64  # d_k: key / query width, shared by all levels
    event_dim: int = 128  # d_z: width of the compressed per-token feature and of the event signal
    chunk: int = 64  # C: tokens per memory event (the write period)
    write_every: tuple[int, ...] = (1, 4, 16)  # level l is written every write_every[l] events (upward consolidation)
    decay: tuple[float, ...] = (0.05, 0.01, 0.002)  # fixed decay d_l per write of level l
    adaptive_decay: bool = False  # data-dependent decay d = d_min + (d_max - d_min) * sigmoid(w_d . z + b_d)
    decay_min: float = 1e-4  # lower end of the adaptive decay range
    decay_max: float = 0.5  # upper end of the adaptive decay range
    addressing: str = "hybrid"  # write addressing: content | lru | hybrid
    hybrid_mix: float = 0.5  # lambda in hybrid addressing: lambda * content + (1 - lambda) * lru
    delta_rule: bool = False  # erase what the address holds before writing (slot form of the gated delta rule)
    write_threshold: float = 0.0  # tau: gate g writes max(g - tau, 0) / (1 - tau); below tau decay only, usage kept
    # the row level: the key/value rows of chosen tokens, read by the attention of layers rows_from.. (runtime/rows.py)
    rows: int = 0  # R: token slots of the row level (0: none)
    rows_from: int = 0  # first layer whose attention reads the rows (they hold layers rows_from..n_layers-1)
    rows_threshold: float = 0.5  # a token is written when its gate g > rows_threshold (and beats the weakest slot)
    rows_decay: float = 1e-3  # each write decays every slot's usage by (1 - rows_decay): old rows yield, slowly
    rows_lookahead: int = 0  # a token is kept with the strongest gate among it and the next rows_lookahead tokens
    rows_place: str = "slot"  # where a row is read from: "slot" (slot j at distance R - j from the sinks' query) or
    #                           "recency" (the k-th newest row held at distance rows_gap + k + 1)
    rows_gap: int = 0  # with "recency": distances kept free between the query and the newest row
    rows_bias: float = 0.0  # added to a visible row's attention logit in every row layer (its weight times e^bias)
    rows_key_scale: float = 1.0  # the rows' keys times this where they are read (a visible row's logit times it)

    @property
    def levels(self) -> int:
        return len(self.slots)

    def validate(self) -> None:
        n = self.levels
        if n < 1:
            raise ConfigError("cms needs at least one level")
        for name in ("widths", "write_every", "decay"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"cms.{name} has {len(getattr(self, name))} entries, expected {n} (one per level)")
        for name in ("slots", "widths", "write_every"):
            if not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_SIZE for x in getattr(self, name)):
                raise ConfigError(f"cms.{name} entries must be integers in [1, {MAX_SIZE}]")
        for name in ("key_dim", "event_dim", "chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE:
                raise ConfigError(f"cms.{name} must be an integer in [1, {MAX_SIZE}]")
        if not all(0.0 < d < 1.0 for d in self.decay):
            raise ConfigError("cms.decay entries must lie in (0, 1)")
        if not 0.0 < self.decay_min <= self.decay_max < 1.0:
            raise ConfigError("cms needs 0 < decay_min <= decay_max < 1")
        if self.addressing not in ADDRESSING_MODES:
            raise ConfigError(f"cms.addressing must be one of {ADDRESSING_MODES}, got {self.addressing!r}")
        if not 0.0 <= self.hybrid_mix <= 1.0:
            raise ConfigError("cms.hybrid_mix must lie in [0, 1]")
        if not 0.0 <= self.write_threshold < 1.0:
            raise ConfigError("cms.write_threshold must lie in [0, 1)")
        for name in ("rows", "rows_from"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SIZE:
                raise ConfigError(f"cms.{name} must be an integer in [0, {MAX_SIZE}]")
        if not 0.0 < self.rows_threshold < 1.0 or not 0.0 <= self.rows_decay < 1.0:
            raise ConfigError("cms needs 0 < rows_threshold < 1 and 0 <= rows_decay < 1")
        v = self.rows_lookahead
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= self.chunk:
            raise ConfigError("cms.rows_lookahead must be an integer in [0, cms.chunk]")
        if not isinstance(self.rows_gap, int) or isinstance(self.rows_gap, bool) or not 0 <= self.rows_gap <= MAX_SIZE:
            raise ConfigError(f"cms.rows_gap must be an integer in [0, {MAX_SIZE}]")
        if isinstance(self.rows_bias, bool) or not isinstance(self.rows_bias, (int, float)) \
                or not 0.0 <= self.rows_bias <= 16.0:
            raise ConfigError("cms.rows_bias must be a number in [0, 16]")
        if isinstance(self.rows_key_scale, bool) or not isinstance(self.rows_key_scale, (int, float)) \
                or not 0.0 < self.rows_key_scale <= 16.0:
            raise ConfigError("cms.rows_key_scale must be a number in (0, 16]")
        if self.rows_place not in ROW_PLACES:
            raise ConfigError(f"cms.rows_place must be one of {ROW_PLACES}, got {self.rows_place!r}")

    def row_layers(self, n_layers: int) -> range:
        """The layers whose attention reads the row level (empty without one)."""
        return range(self.rows_from, n_layers) if self.rows else range(0)

    def state_floats(self) -> list[int]:
        """fp32 values held per level: memory N*d plus keys N*d_k."""
        return [n * (d + self.key_dim) for n, d in zip(self.slots, self.widths)]


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (HF Llama names and maths) with a CMS sidecar and a bounded attention state."""

    vocab_size: int = 49152  # tokenizer vocabulary
    dim: int = 576  # model width D
    n_layers: int = 30  # decoder blocks
    n_heads: int = 9  # query heads H
    n_kv_heads: int = 3  # key/value heads (grouped-query attention)
    head_dim: int = 64  # per-head width
    ffn_dim: int = 1536  # SwiGLU hidden width
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 100000.0  # RoPE base
    tie_embeddings: bool = True  # output projection shares the embedding matrix (in torch; untied at export)
    attn_bias: bool = False  # q/k/v projection biases (Qwen2-style, and Llama's attention_bias)
    attn_out_bias: bool = False  # o_proj bias (Llama's attention_bias; Qwen2 has none)
    mlp_bias: bool = False  # gate/up/down projection biases (Llama's mlp_bias)
    hidden_act: str = "silu"  # MLP gate activation, one of ACTIVATIONS
    rope_freq_divisors: tuple[float, ...] = ()  # RoPE scaling: frequency i is theta^(-2i/hd) / divisor[i] (hd/2
    #                                            entries: llama3 or linear scaling, a GGUF's rope_freqs); () none
    sinks: int = 4  # S: first tokens kept forever in the attention state (StreamingLLM)
    window: int = 1024  # W: ring buffer of the most recent tokens
    memory_layer: int = 15  # the CMS is read after this block (0-based) and its hidden state feeds the writes
    cms: CMSConfig = field(default_factory=CMSConfig)  # the memory sidecar

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE:
                raise ConfigError(f"{name} must be an integer in [1, {MAX_SIZE}], got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_heads must be a multiple of n_kv_heads")
        if self.head_dim % 2:
            raise ConfigError("head_dim must be even (RoPE)")
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or not 0 <= self.sinks <= MAX_SIZE:
            raise ConfigError("sinks must be an integer >= 0")
        if not isinstance(self.memory_layer, int) or isinstance(self.memory_layer, bool):
            raise ConfigError("memory_layer must be an integer")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                   for x in (self.norm_eps, self.rope_theta)):
            raise ConfigError("norm_eps and rope_theta must be positive numbers")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.rope_freq_divisors and (len(self.rope_freq_divisors) != self.head_dim // 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1e9 for x in self.rope_freq_divisors)):
            raise ConfigError(f"rope_freq_divisors must hold head_dim/2 = {self.head_dim // 2} positive numbers")
        if not 0 <= self.memory_layer < self.n_layers:
            raise ConfigError(f"memory_layer must be in [0, {self.n_layers})")
        if self.cms.chunk > self.window:
            raise ConfigError("cms.chunk must not exceed the attention window")
        if self.cms.rows and not (self.sinks and 0 <= self.cms.rows_from < self.n_layers):
            raise ConfigError(f"a row level needs sinks (its rows are seen from the sinks' query) and cms.rows_from in "
                              f"[0, {self.n_layers})")
        if self.cms.rows and 2 * self.cms.chunk > self.window:
            raise ConfigError("a row level needs 2 * cms.chunk <= window (a chunk's rows are taken from the attention "
                              "buffer one event later)")
        self.cms.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("model config must be a JSON object")
        d = dict(d)
        if isinstance(d.get("rope_freq_divisors"), list):
            d["rope_freq_divisors"] = tuple(d["rope_freq_divisors"])
        cms = d.pop("cms", {})
        if not isinstance(cms, dict):
            raise ConfigError("cms config must be a JSON object")
        try:
            cms_cfg = CMSConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cms.items()})
            cfg = cls(**d, cms=cms_cfg)
        except TypeError as e:
            raise ConfigError(f"unknown or missing config field: {e}") from None
        cfg.validate()
        return cfg


def rope_inv_freq(head_dim: int, theta: float, divisors: tuple[float, ...] = ()) -> list[float]:
    """RoPE's hd/2 frequencies (float64): theta^(-2i/hd), each divided by its scaling divisor if any."""
    inv = [1.0 / (theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
    return [f / d for f, d in zip(inv, divisors)] if divisors else inv


def llama3_divisors(head_dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> tuple[float, ...]:
    """Llama 3.x RoPE scaling as transformers computes it (_compute_llama3_parameters), as divisors:
    long wavelengths divided by factor, short ones kept, a smooth blend in between."""
    import math

    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for f in rope_inv_freq(head_dim, theta):
        wavelen = 2 * math.pi / f
        if wavelen > low_wavelen:
            scaled = f / factor
        elif wavelen < high_wavelen:
            scaled = f
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            scaled = (1 - smooth) * f / factor + smooth * f
        out.append(f / scaled)
    return tuple(out)


def tiny_config() -> ModelConfig:
    """builtin:tiny: under 1M parameters, for tests and the first demo."""
    return ModelConfig(
        vocab_size=264,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=192,
        rope_theta=10000.0,
        tie_embeddings=True,
        sinks=4,
        window=48,
        memory_layer=0,
        cms=CMSConfig(
            slots=(16, 32, 64),
            widths=(32, 64, 128),
            key_dim=16,
            event_dim=32,
            chunk=16,
            write_every=(1, 2, 4),
            decay=(0.05, 0.01, 0.002),
        ),
    )


def tiny_rows_config() -> ModelConfig:
    """builtin:tiny with a row level read by its last block (tests of the row memory)."""
    t = tiny_config()
    return dataclasses.replace(t, cms=dataclasses.replace(t.cms, rows=8, rows_from=1, rows_threshold=0.5,
                                                                 rows_lookahead=2))


def recall_config() -> ModelConfig:
    """builtin:recall: the model `cortex-edge train` teaches pass-key recall through the CMS.

    Byte-level like builtin:tiny, a little wider and one block deeper so that a block after the
    memory read can pick the digit to say. The memory keeps what its write gate lets in: LRU
    addressing puts each event in the least-used slot, and the learned (adaptive) decay may go
    as low as 1e-5 per event, so a needle survives 64k tokens (4,096 events: (1 - 1e-5)^4096 > 0.95).
    """
    return ModelConfig(
        vocab_size=264,
        dim=96,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        head_dim=24,
        ffn_dim=256,
        rope_theta=10000.0,
        tie_embeddings=True,
        sinks=4,
        window=64,
        memory_layer=1,
        cms=CMSConfig(
            slots=(16, 16, 32),
            widths=(64, 64, 64),
            key_dim=16,
            event_dim=64,
            chunk=16,
            write_every=(1, 4, 16),
            decay=(0.05, 0.01, 0.002),
            adaptive_decay=True,
            decay_min=1e-5,
            decay_max=0.2,
            addressing="lru",
            write_threshold=0.05,
        ),
    )
