"""Rotary position embeddings (RoPE) with the default, linear, llama3 and YaRN frequency scalings.

RoPE rotates each (x_i, x_{i+d/2}) pair of a query/key head by the angle position * inv_freq_i
(Su et al., 2021, https://arxiv.org/abs/2104.09864). We use the "rotate_half" layout of Hugging Face
transformers; GGUF files store Q/K rows interleaved for llama.cpp's layout, which the GGUF loader undoes.
"""

from __future__ import annotations

import math

import torch

from lmgen.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq (head_dim/2,) float32, attention_factor) for the config's RoPE scaling type."""
    dim, base, rope = config.head_dim, config.rope_theta, config.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":  # position interpolation: positions divided by `factor`
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if kind == "yarn":
        return _yarn(config, rope)
    if kind == "freq_factors":  # llama.cpp's `rope_freqs` tensor (how GGUF stores llama3 scaling): divisors per frequency
        return inv_freq / rope["factors"].float(), 1.0
    raise ValueError(f"unsupported rope_type {kind!r}")


def _llama3(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1's scaling: low frequencies divided by `factor`, high ones kept, a smooth ramp between
    (constants from Meta's llama-models `apply_scaling`, also transformers `_compute_llama3_parameters`)."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(config: ModelConfig, rope: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023, https://arxiv.org/abs/2309.00071): interpolate low frequencies, keep high ones,
    and scale cos/sin by 0.1*ln(factor)+1. beta_fast=32, beta_slow=1 are the paper's defaults."""
    dim, base = config.head_dim, config.rope_theta
    factor = float(rope["factor"])
    orig = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables over positions, computed once; a step only looks its positions up (one index op each instead
    of the ~10 ops that build them), and every layer rotates its q and k with the same rows.

    The tables cover `reserved` positions, grown (doubling) by `reserve`, which the model calls with each
    step's highest position (AttentionMetadata.max_position): a window of 128k positions would cost 128 MiB of
    tables if built up front."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 initial_positions: int = 4096):
        super().__init__()
        inv_freq, self.attention_factor = inv_frequencies(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # (head_dim/2,) float32
        self.dtype = dtype
        self.reserved = 0
        self.reserve(min(initial_positions, config.max_position_embeddings))

    def reserve(self, positions: int) -> None:
        """Makes the tables cover positions [0, positions)."""
        if positions <= self.reserved:
            return
        n = max(positions, 2 * self.reserved)
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        # computed in float32 as transformers does, then cast to the model's dtype
        freqs = pos[:, None] * self.inv_freq[None, :]  # (n, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
        self.register_buffer("cos_table", (emb.cos() * self.attention_factor).to(self.dtype), persistent=False)
        self.register_buffer("sin_table", (emb.sin() * self.attention_factor).to(self.dtype), persistent=False)
        self.reserved = n

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (tokens,) int64, each < `reserved` -> cos, sin (tokens, head_dim)."""
        return self.cos_table[positions], self.sin_table[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (tokens, heads, head_dim) rotated by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
