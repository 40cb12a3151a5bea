"""What Gemma 3, Qwen3 and GPT-2 configs say beyond a Llama config, read from HF config.json or GGUF metadata.

`hf_family` / `gguf_family` return the config under Llama's key names (GPT-2 spells them n_embd, n_layer, ...)
and the extra `ModelConfig` fields of the family; `ModelConfig.__post_init__` validates every value.  GGUF
conventions are llama.cpp's (src/llama-model.cpp, convert_hf_to_gguf.py): Gemma 3 files carry no layer pattern
(llama.cpp uses one global layer in 6) and no local RoPE base (10,000).
"""

from __future__ import annotations

from typing import Any

from lmgen.errors import ModelFormatError, UnsupportedModelError

# HF model_type -> architecture, for a config.json without `architectures`
FAMILY_MODEL_TYPES = {"gemma3_text": "Gemma3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}

GEMMA3_LOCAL_ROPE_THETA = 10000.0  # rope_local_base_freq of every Gemma 3 (transformers' Gemma3TextConfig)
GEMMA3_SLIDING_PATTERN = 6  # one global layer in 6 (llama.cpp hparams.set_swa_pattern(6) for LLM_ARCH_GEMMA3)
# activation names -> lmgen's: "gelu_tanh" (GELU's tanh approximation) or "gelu" (exact erf)
_GELU = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def _gelu(name: Any, key: str) -> str:
    if name not in _GELU:
        raise UnsupportedModelError(f"unsupported {key} {name!r}; lmgen implements {', '.join(_GELU)}")
    return _GELU[name]


def _layer_types(types: Any, n_layers: Any, where: str) -> tuple[str, ...]:
    if not isinstance(types, list) or not isinstance(n_layers, int) or len(types) != n_layers or not set(types) <= {
            "sliding_attention", "full_attention"}:
        raise ModelFormatError(f"{where}layer_types must list 'sliding_attention' / 'full_attention' for each of the "
                               f"{n_layers} layers, got {str(types)[:120]}", key="layer_types", value=types)
    return tuple(types)


def _pattern_types(n_layers: int, pattern: int) -> tuple[str, ...]:
    """Layer i is global when (i + 1) % pattern == 0 (transformers' Gemma3TextConfig and llama.cpp agree)."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers))


def hf_family(arch: str, cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json under Llama's key names, extra ModelConfig fields) for a family architecture."""
    where = "config.json: "
    cfg = dict(cfg)
    if arch == "Qwen3ForCausalLM":
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError("Qwen3 with use_sliding_window=true (a per-layer sliding window) is not supported")
        cfg.pop("sliding_window", None)
        return cfg, {"qk_norm": True, "attention_bias": bool(cfg.get("attention_bias", False))}
    if arch == "Gemma3ForCausalLM":
        rope = cfg.get("rope_parameters") or {}
        local_theta = GEMMA3_LOCAL_ROPE_THETA
        if "full_attention" in rope or "sliding_attention" in rope:  # transformers 5: one entry per layer type
            local = dict(rope.get("sliding_attention") or {})
            local_theta = local.get("rope_theta", local_theta)
            if local.get("rope_type", "default") != "default":
                raise UnsupportedModelError(f"Gemma 3 sliding layers with rope_type {local.get('rope_type')!r}")
            cfg["rope_parameters"] = dict(rope.get("full_attention") or {"rope_type": "default"})
        else:  # transformers 4.x: rope_theta / rope_scaling for global layers, rope_local_base_freq for local ones
            local_theta = cfg.get("rope_local_base_freq", local_theta)
        n_layers = cfg.get("num_hidden_layers")
        types = cfg.get("layer_types")
        if types is None:
            pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", GEMMA3_SLIDING_PATTERN))
            types = _pattern_types(n_layers, pattern) if isinstance(n_layers, int) and isinstance(pattern, int) else None
        types = _layer_types(list(types) if types is not None else None, n_layers, where)
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention=true (an encoder) is not supported")
        cfg.pop("hidden_act", None)
        extra = {
            "norm_type": "rms_one_plus", "hidden_act": _gelu(cfg.get("hidden_activation", "gelu_pytorch_tanh"),
                                                             "hidden_activation"),
            "qk_norm": True, "sandwich_norm": True, "embedding_scale": float(cfg.get("hidden_size", 0)) ** 0.5,
            "layer_types": types, "rope_local_theta": local_theta,
            "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar", cfg.get("head_dim")),
            "final_logit_softcapping": cfg.get("final_logit_softcapping"),
            "attn_logit_softcapping": cfg.get("attn_logit_softcapping"),
            "attention_bias": bool(cfg.get("attention_bias", False)),
            "sliding_window": cfg.get("sliding_window"),
        }
        return cfg, extra
    if arch == "GPT2LMHeadModel":
        names = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                 "n_positions": "max_position_embeddings", "layer_norm_epsilon": "rms_norm_eps"}
        out = {k: v for k, v in cfg.items() if k not in names}
        for old, new in names.items():
            if old in cfg:
                out[new] = cfg[old]
        hidden = out.get("hidden_size")
        out["intermediate_size"] = cfg.get("n_inner") or (4 * hidden if isinstance(hidden, int) else None)
        out.setdefault("tie_word_embeddings", True)
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn") or cfg.get(
                "add_cross_attention") or cfg.get("scale_attn_weights") is False:
            raise UnsupportedModelError("GPT-2 with scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, "
                                        "add_cross_attention or scale_attn_weights=false is not supported")
        return out, {"norm_type": "layer", "hidden_act": _gelu(cfg.get("activation_function", "gelu_new"),
                                                               "activation_function"),
                     "mlp_gated": False, "position_embedding": "learned", "attention_bias": True, "o_bias": True,
                     "mlp_bias": True}
    return cfg, {}


def gguf_family(gguf_arch: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Extra ModelConfig fields for a family's GGUF (keys `{arch}.*` as llama.cpp writes them)."""
    if gguf_arch == "qwen3":
        return {"qk_norm": True, "attention_bias": False}
    if gguf_arch == "gemma3":
        n_layers = meta.get("gemma3.block_count")
        pattern = meta.get("gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise ModelFormatError(f"GGUF metadata: gemma3.attention.sliding_window_pattern must be a positive "
                                   f"integer, got {pattern!r}", key="gemma3.attention.sliding_window_pattern",
                                   value=pattern)
        hidden, heads = meta.get("gemma3.embedding_length"), meta.get("gemma3.attention.head_count")
        head_dim = meta.get("gemma3.attention.key_length")
        # llama.cpp: Gemma 3 27B (62 layers) scales queries by 1/sqrt(hidden / heads), the others by 1/sqrt(head_dim)
        scalar = hidden // heads if n_layers == 62 and isinstance(hidden, int) and isinstance(heads, int) and heads \
            else head_dim
        return {  # norm_type "rms": llama.cpp's converter stores Gemma's norm weights as 1 + w already
            "norm_type": "rms", "hidden_act": "gelu_tanh", "qk_norm": True, "sandwich_norm": True,
            "embedding_scale": float(hidden) ** 0.5 if isinstance(hidden, int) else None,
            "layer_types": _pattern_types(n_layers, pattern) if isinstance(n_layers, int) else None,
            "rope_local_theta": GEMMA3_LOCAL_ROPE_THETA, "query_pre_attn_scalar": scalar,
            "final_logit_softcapping": meta.get("gemma3.final_logit_softcapping"),
            "attn_logit_softcapping": meta.get("gemma3.attn_logit_softcapping"),
        }
    if gguf_arch == "gpt2":
        return {"norm_type": "layer", "hidden_act": "gelu_tanh", "mlp_gated": False, "position_embedding": "learned",
                "attention_bias": True, "o_bias": True, "mlp_bias": True,
                "rms_norm_eps": meta.get("gpt2.attention.layer_norm_epsilon", 1e-5)}
    return {}
