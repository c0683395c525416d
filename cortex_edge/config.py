"""Model and memory configuration: frozen dataclasses, one comment per field.

Stdlib only: the runtime on the Pi reads these from a bundle's manifest without torch.
What this leaves out: how weights are made (cortex_edge.model) or stored (export, quantize).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ADDRESSING_MODES = ("content", "lru", "hybrid")


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
        if any(s < 1 for s in self.slots) or any(w < 1 for w in self.widths):
            raise ConfigError("cms slots and widths must be positive")
        if any(e < 1 for e in self.write_every):
            raise ConfigError("cms.write_every entries must be >= 1")
        if not all(0.0 < d < 1.0 for d in self.decay):
            raise ConfigError("cms.decay entries must lie in (0, 1)")
        if not 0.0 < self.decay_min <= self.decay_max < 1.0:
            raise ConfigError("cms needs 0 < decay_min <= decay_max < 1")
        if self.addressing not in ADDRESSING_MODES:
            raise ConfigError(f"cms.addressing must be one of {ADDRESSING_MODES}, got {self.addressing!r}")
        if not 0.0 <= self.hybrid_mix <= 1.0:
            raise ConfigError("cms.hybrid_mix must lie in [0, 1]")
        if self.chunk < 1 or self.key_dim < 1 or self.event_dim < 1:
            raise ConfigError("cms chunk, key_dim and event_dim must be positive")

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
    attn_bias: bool = False  # q/k/v projection biases (Qwen2-style)
    sinks: int = 4  # S: first tokens kept forever in the attention state (StreamingLLM)
    window: int = 1024  # W: ring buffer of the most recent tokens
    memory_layer: int = 15  # the CMS is read after this block (0-based) and its hidden state feeds the writes
    cms: CMSConfig = field(default_factory=CMSConfig)  # the memory sidecar

    def validate(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("n_heads must be a multiple of n_kv_heads")
        if self.head_dim % 2:
            raise ConfigError("head_dim must be even (RoPE)")
        if not 0 <= self.memory_layer < self.n_layers:
            raise ConfigError(f"memory_layer must be in [0, {self.n_layers})")
        if self.window < 1 or self.sinks < 0:
            raise ConfigError("window must be >= 1 and sinks >= 0")
        if self.cms.chunk > self.window:
            raise ConfigError("cms.chunk must not exceed the attention window")
        self.cms.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("model config must be a JSON object")
        d = dict(d)
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
