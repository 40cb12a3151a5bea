"""ModelConfig: the shape of a decoder-only transformer, from a HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Architectures whose weights and forward pass lmgen implements (HF `architectures[0]` names).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# GGUF `general.architecture` -> HF architecture name. Mistral GGUFs are written as "llama".
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its options) is not one lmgen implements."""


@dataclass
class ModelConfig:
    """Everything the forward pass needs to know about a model, independent of the file format."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "default"|"linear"|"llama3"|"yarn", "factor": ..., ...} as in HF `rope_parameters`.
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama with attention_bias=True)
    o_bias: bool = False  # the output projection carries a bias (Llama attention_bias=True only)
    mlp_bias: bool = False
    # Mistral's sliding-window attention: a query at position p sees positions p - sliding_window < j <= p
    # (transformers' `sliding_window_overlay`); None: the whole context
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; lmgen supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3", "yarn", "freq_factors"):
            raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3, yarn")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        """Builds the config from a parsed `config.json` (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
            cfg.get("model_type", ""), str(cfg.get("model_type"))
        )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {arch!r}; lmgen supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {cfg.get('hidden_act')!r}; lmgen implements SwiGLU (silu)")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
            if "type" in rope and "rope_type" not in rope:  # transformers 4.x wrote "type"
                rope["rope_type"] = rope.pop("type")
            rope.setdefault("rope_type", "default")
            if rope.get("partial_rotary_factor", 1.0) != 1.0:
                raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
            eos = (generation_config or {}).get("eos_token_id", cfg.get("eos_token_id"))
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            is_qwen2 = arch == "Qwen2ForCausalLM"
            window = cfg.get("sliding_window") if arch == "MistralForCausalLM" else None
            if is_qwen2 and cfg.get("use_sliding_window"):  # only on layers >= max_window_layers
                raise UnsupportedModelError("Qwen2 with use_sliding_window=true (a per-layer sliding window) is not supported")
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=rope,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
                o_bias=(not is_qwen2) and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing the required field {e.args[0]!r}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int | None = None) -> "ModelConfig":
        """Builds the config from GGUF key/values (`{arch}.block_count`, `{arch}.rope.freq_base`, ...)."""
        gguf_arch = meta.get("general.architecture")
        if gguf_arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {gguf_arch!r}; lmgen supports {', '.join(GGUF_ARCHITECTURES)}"
            )

        def key(name: str, default: Any = KeyError) -> Any:
            full = f"{gguf_arch}.{name}"
            if full in meta:
                return meta[full]
            if default is KeyError:
                raise ValueError(f"GGUF metadata is missing the required key {full!r}")
            return default

        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // heads)
        rope = {"rope_type": "default"}
        scaling_type = key("rope.scaling.type", "none")
        if scaling_type == "linear":
            rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        elif scaling_type == "yarn":
            rope = {
                "rope_type": "yarn",
                "factor": float(key("rope.scaling.factor")),
                "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
            }
        elif scaling_type not in ("none", None):
            raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}")
        n_vocab = vocab_size or int(key("vocab_size", 0)) or len(meta.get("tokenizer.ggml.tokens", []))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            architecture=GGUF_ARCHITECTURES[gguf_arch],
            vocab_size=n_vocab,
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=int(key("context_length", 2048)),
            attention_bias=gguf_arch == "qwen2",
            sliding_window=int(key("attention.sliding_window", 0)) or None,  # written for Mistral-style files only
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )
