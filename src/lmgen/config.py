"""ModelConfig: the shape of a decoder-only transformer, from a HF config.json or GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lmgen.config_families import FAMILY_MODEL_TYPES, gguf_family, hf_family
from lmgen.errors import ModelFormatError, UnsupportedModelError
from lmgen.models.registry import ARCHITECTURES, GGUF_ARCHITECTURES


NORM_TYPES = ("rms", "rms_one_plus", "layer")  # x * w / rms(x); x * (1 + w) / rms(x) (Gemma); LayerNorm (GPT-2)
HIDDEN_ACTS = ("silu", "gelu_tanh", "gelu")
LAYER_TYPES = ("full_attention", "sliding_attention")


# A context window larger than any published model's (10M tokens): the value sizes the KV cache and RoPE tables.
MAX_CONTEXT = 1 << 24


def checked_int(value: Any, key: str, where: str, low: int = 1, high: int | None = None) -> int:
    """`value` if it is an integer in [low, high]; else a ModelFormatError naming `key` as `where` spells it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ModelFormatError(f"{where}{key} must be {bound}, got {value!r}", key=key, value=value)
    return value


def checked_float(value: Any, key: str, where: str) -> float:
    """`value` as a float if it is a finite positive number; else a ModelFormatError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelFormatError(f"{where}{key} must be a finite positive number, got {value!r}", key=key, value=value)
    return float(value)


def derived_head_dim(hidden: int, heads: int, hidden_key: str, heads_key: str, where: str) -> int:
    """hidden / heads, the head size a config without an explicit one implies; it must divide exactly."""
    if hidden % heads:
        raise ModelFormatError(f"{where}{hidden_key} ({hidden}) is not a multiple of {heads_key} ({heads}) and no "
                               f"head size is given", key=hidden_key, value=hidden)
    return hidden // heads


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
    # ---- what other families add (lmgen.config_families); the defaults are Llama's ----
    norm_type: str = "rms"  # NORM_TYPES
    hidden_act: str = "silu"  # HIDDEN_ACTS: the MLP's activation
    mlp_gated: bool = True  # act(gate(x)) * up(x) (Llama, Gemma, Qwen); False: act(up(x)) (GPT-2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # norms after attention and after the MLP too, before the residual add (Gemma)
    embedding_scale: float | None = None  # token embeddings times this (Gemma: sqrt(hidden_size))
    position_embedding: str = "rope"  # "rope" | "learned" (GPT-2's absolute position table)
    # per layer "full_attention" | "sliding_attention" (sliding_window applies to the latter); None: all full, or
    # all sliding when sliding_window is set (Mistral)
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3: 10,000)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power instead of head_dim's (Gemma)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcapping: float | None = None  # the same on attention scores

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; lmgen supports {', '.join(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            checked_int(getattr(self, name), name, "model config ")
        checked_int(self.max_position_embeddings, "max_position_embeddings", "model config ", 1, MAX_CONTEXT)
        checked_float(self.rms_norm_eps, "rms_norm_eps", "model config ")
        checked_float(self.rope_theta, "rope_theta", "model config ")
        if self.sliding_window is not None:
            checked_int(self.sliding_window, "sliding_window", "model config ")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
                                   key="num_kv_heads", value=self.num_kv_heads)
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim must be even (RoPE rotates pairs of values), got {self.head_dim}",
                                   key="head_dim", value=self.head_dim)
        if "factor" in self.rope_scaling:
            checked_float(self.rope_scaling["factor"], "rope scaling factor", "model config ")
        self._check_family_fields()
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3", "yarn", "freq_factors"):
            raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3, yarn")

    def _check_family_fields(self) -> None:
        where = "model config "
        for name, allowed in (("norm_type", NORM_TYPES), ("hidden_act", HIDDEN_ACTS),
                              ("position_embedding", ("rope", "learned"))):
            if getattr(self, name) not in allowed:
                raise UnsupportedModelError(f"{where}{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("embedding_scale", "rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping",
                     "attn_logit_softcapping"):
            if getattr(self, name) is not None:
                setattr(self, name, checked_float(getattr(self, name), name, where))
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ModelFormatError(f"{where}layer_types must name {' or '.join(LAYER_TYPES)} for each of the "
                                       f"{self.num_layers} layers, got {str(self.layer_types)[:120]}",
                                       key="layer_types", value=self.layer_types)
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ModelFormatError(f"{where}has sliding_attention layers but no sliding_window",
                                       key="sliding_window", value=None)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (None: it sees the whole context)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base of decoder layer `layer` (Gemma 3's sliding layers have their own)."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return self.rope_local_theta
        return self.rope_theta

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        """Builds the config from a parsed `config.json` (transformers 4.x `rope_scaling` or 5.x `rope_parameters`);
        what a family adds to Llama's fields is read by lmgen.config_families."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       **FAMILY_MODEL_TYPES}.get(cfg.get("model_type", ""), str(cfg.get("model_type")))
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {arch!r}; lmgen supports {', '.join(ARCHITECTURES)}")
        cfg, extra = hf_family(arch, cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {cfg.get('hidden_act')!r}; lmgen implements SwiGLU (silu)")
        where = "config.json: "

        def req(name: str) -> Any:
            if name not in cfg:
                raise ModelFormatError(f"config.json is missing the required field {name!r}", key=name, value=None)
            return cfg[name]

        def size(name: str, value: Any = KeyError) -> int:
            return checked_int(req(name) if value is KeyError else value, name, where)

        hidden, heads = size("hidden_size"), size("num_attention_heads")
        head_dim = cfg.get("head_dim")
        head_dim = size("head_dim", head_dim) if head_dim is not None else derived_head_dim(
            hidden, heads, "hidden_size", "num_attention_heads", where)
        kv_heads = cfg.get("num_key_value_heads")
        kv_heads = size("num_key_value_heads", kv_heads) if kv_heads is not None else heads
        if heads % kv_heads:
            raise ModelFormatError(f"{where}num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                                   f"({kv_heads})", key="num_key_value_heads", value=kv_heads)
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
        return cls(**{**dict(
            architecture=arch,
            vocab_size=size("vocab_size"),
            hidden_size=hidden,
            intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=checked_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
            rope_theta=checked_float(theta, "rope_theta", where),
            rope_scaling=rope,
            max_position_embeddings=checked_int(cfg.get("max_position_embeddings", 2048), "max_position_embeddings",
                                                where, 1, MAX_CONTEXT),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
            o_bias=(not is_qwen2) and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=size("sliding_window", window) if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        ), **extra})

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], vocab_size: int | None = None) -> "ModelConfig":
        """Builds the config from GGUF key/values (`{arch}.block_count`, `{arch}.rope.freq_base`, ...)."""
        gguf_arch = meta.get("general.architecture")
        if gguf_arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {gguf_arch!r}; lmgen supports {', '.join(GGUF_ARCHITECTURES)}"
            )

        where = "GGUF metadata: "

        def key(name: str, default: Any = KeyError) -> Any:
            full = f"{gguf_arch}.{name}"
            if full in meta:
                return meta[full]
            if default is KeyError:
                raise ModelFormatError(f"GGUF metadata is missing the required key {full!r}", key=full, value=None)
            return default

        def size(name: str, default: Any = KeyError, high: int | None = None) -> int:
            return checked_int(key(name, default), f"{gguf_arch}.{name}", where, 1, high)

        hidden, heads = size("embedding_length"), size("attention.head_count")
        head_dim = key("attention.key_length", None)
        rope_dims = key("rope.dimension_count", None)
        if head_dim is not None:
            head_dim = size("attention.key_length")
        elif rope_dims is not None:
            head_dim = size("rope.dimension_count")
        else:
            head_dim = derived_head_dim(hidden, heads, f"{gguf_arch}.embedding_length",
                                        f"{gguf_arch}.attention.head_count", where)
        if rope_dims is not None and size("rope.dimension_count") != head_dim:
            raise UnsupportedModelError(f"{gguf_arch}.rope.dimension_count = {rope_dims} differs from the head size "
                                        f"{head_dim}: partial rotary embeddings are not supported")
        kv_heads = size("attention.head_count_kv", heads)
        if heads % kv_heads:
            raise ModelFormatError(f"{where}{gguf_arch}.attention.head_count ({heads}) is not a multiple of "
                                   f"{gguf_arch}.attention.head_count_kv ({kv_heads})",
                                   key=f"{gguf_arch}.attention.head_count_kv", value=kv_heads)
        rope: dict[str, Any] = {"rope_type": "default"}
        scaling_type = key("rope.scaling.type", "none")
        if scaling_type in ("linear", "yarn"):
            rope = {"rope_type": scaling_type,
                    "factor": checked_float(key("rope.scaling.factor"), f"{gguf_arch}.rope.scaling.factor", where)}
        if scaling_type == "yarn":
            rope = {
                **rope,
                "original_max_position_embeddings": size("rope.scaling.original_context_length", high=MAX_CONTEXT),
            }
        elif scaling_type not in ("none", "linear", None):
            raise UnsupportedModelError(f"unsupported GGUF rope scaling type {scaling_type!r}")
        declared = size("vocab_size") if key("vocab_size", None) is not None else None
        if vocab_size and declared is not None and declared != vocab_size:
            raise ModelFormatError(f"{where}{gguf_arch}.vocab_size ({declared}) differs from the {vocab_size} tokens of "
                                   f"tokenizer.ggml.tokens", key=f"{gguf_arch}.vocab_size", value=declared)
        n_vocab = vocab_size or declared or len(meta.get("tokenizer.ggml.tokens", []))

        def token_id(name: str) -> int | None:
            """A special token id; one outside the vocabulary is dropped (the tokenizer warns about it)."""
            value = meta.get(f"tokenizer.ggml.{name}")
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelFormatError(f"{where}tokenizer.ggml.{name} must be an integer token id, got {value!r}",
                                       key=f"tokenizer.ggml.{name}", value=value)
            return value if 0 <= value < n_vocab else None

        eos = token_id("eos_token_id")
        return cls(**{**dict(
            architecture=GGUF_ARCHITECTURES[gguf_arch],
            vocab_size=n_vocab,
            hidden_size=hidden,
            intermediate_size=size("feed_forward_length"),
            num_layers=size("block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=checked_float(key("attention.layer_norm_rms_epsilon", 1e-5),
                                       f"{gguf_arch}.attention.layer_norm_rms_epsilon", where),
            rope_theta=checked_float(key("rope.freq_base", 10000.0), f"{gguf_arch}.rope.freq_base", where),
            rope_scaling=rope,
            max_position_embeddings=size("context_length", 2048, MAX_CONTEXT),
            attention_bias=gguf_arch == "qwen2",
            # written for Mistral-style files only; 0: none
            sliding_window=size("attention.sliding_window") if key("attention.sliding_window", 0) else None,
            bos_token_id=token_id("bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
        ), **gguf_family(gguf_arch, meta)})
