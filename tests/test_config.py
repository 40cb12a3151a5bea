"""ModelConfig from real config.json shapes, and building Llama-3-8B's full shape without its weights."""

from __future__ import annotations

import pytest
import torch

from lmgen.config import ModelConfig
from lmgen.errors import UnsupportedModelError
from lmgen.layers.rope import RotaryEmbedding, inv_frequencies
from lmgen.layers.attention import AttentionMetadata
from lmgen.models.registry import build_model

# meta-llama/Llama-3.1-8B-Instruct config.json (transformers 4.x layout: rope_theta + rope_scaling)
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def test_llama31_config_parses_with_eos_list_and_llama3_rope():
    cfg = ModelConfig.from_hf_config(LLAMA_31_8B)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4096, 32, 32, 8, 128)
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    gen = ModelConfig.from_hf_config(LLAMA_31_8B, {"eos_token_id": [128001, 128009]})
    assert gen.eos_token_ids == (128001, 128009)  # generation_config.json wins


def test_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (None, {"rope_type": "linear", "factor": 4.0}, LLAMA_31_8B["rope_scaling"],
                    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}):
        hf = LlamaConfig(**{k: v for k, v in LLAMA_31_8B.items() if k not in ("rope_scaling", "architectures")},
                         rope_scaling=scaling)
        kind = (scaling or {}).get("rope_type", "default")
        if kind == "default":
            expected, factor = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128)), 1.0
        else:
            expected, factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
        ours, our_factor = inv_frequencies(ModelConfig.from_hf_config({**LLAMA_31_8B, "rope_scaling": scaling}))
        torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
        assert our_factor == pytest.approx(factor)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA_31_8B["rope_scaling"],
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}],
                         ids=["default", "linear", "llama3", "yarn"])
def test_rope_tables_match_transformers_cos_sin(scaling):
    """The precomputed tables equal transformers' per-step cos/sin, also past the first table size (grown by
    `reserve`), and growing keeps the rows already there."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = LlamaConfig(**{**LLAMA_31_8B, "rope_scaling": scaling})
    rope = RotaryEmbedding(ModelConfig.from_hf_config({**LLAMA_31_8B, "rope_scaling": scaling}), initial_positions=64)
    first = rope.cos_table.clone()
    rope.reserve(5000)
    assert rope.reserved >= 5000 and torch.equal(rope.cos_table[:64], first)
    positions = torch.tensor([0, 1, 63, 64, 1000, 4999])
    cos, sin = rope(positions)  # (tokens, head_dim)
    x = torch.zeros(1, len(positions), 8)
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(x, positions[None])  # (1, tokens, head_dim)
    torch.testing.assert_close(cos, hf_cos[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin, hf_sin[0], rtol=1e-5, atol=1e-5)


def test_llama3_8b_shape_builds_and_runs_on_meta_device():
    """The full 8B shape (4096 wide, 32 layers, 128k vocabulary) loads: every tensor is checked against the
    config and a forward pass propagates shapes — on PyTorch's meta device, which allocates nothing."""
    cfg = ModelConfig.from_hf_config(LLAMA_31_8B)
    h, inter, q, kv = 4096, 14336, 4096, 1024
    shapes = {"model.embed_tokens.weight": (128256, h), "model.norm.weight": (h,), "lm_head.weight": (128256, h)}
    for i in range(32):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    weights = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    model = build_model(cfg, weights.items(), dtype=torch.bfloat16, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 8_030_261_248  # Llama-3-8B's published parameter count
    tokens, slots = 5, 64
    caches = [(torch.empty(slots // 16, 8, 16, 128, dtype=torch.bfloat16, device="meta"),) * 2  # (blocks, kv_heads,
              for _ in range(32)]                                                               # block_size, head_dim)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens, device="meta"), query_index=torch.zeros(1, tokens, dtype=torch.long, device="meta"),
        output_index=torch.arange(tokens, device="meta"), kv_index=torch.zeros(1, tokens, dtype=torch.long, device="meta"),
        mask=torch.ones(1, 1, tokens, tokens, dtype=torch.bool, device="meta"),
    )
    hidden = model(torch.zeros(tokens, dtype=torch.long, device="meta"), torch.arange(tokens, device="meta"), caches, meta)
    assert hidden.shape == (tokens, 4096)
    assert model.compute_logits(hidden).shape == (tokens, 128256)


def test_unsupported_options_are_named():
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        ModelConfig.from_hf_config({**LLAMA_31_8B, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ModelConfig.from_hf_config({**LLAMA_31_8B, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf_config({k: v for k, v in LLAMA_31_8B.items() if k != "num_hidden_layers"})


def test_sliding_window_is_read_for_mistral_only():
    mistral = {**LLAMA_31_8B, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "rope_scaling": None}
    assert ModelConfig.from_hf_config({**mistral, "sliding_window": 4096}).sliding_window == 4096  # Mistral-7B-v0.1
    assert ModelConfig.from_hf_config({**mistral, "sliding_window": None}).sliding_window is None  # v0.2 and later
    qwen2 = {**LLAMA_31_8B, "architectures": ["Qwen2ForCausalLM"], "rope_scaling": None, "sliding_window": 32768}
    assert ModelConfig.from_hf_config({**qwen2, "use_sliding_window": False}).sliding_window is None
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        ModelConfig.from_hf_config({**qwen2, "use_sliding_window": True})


TINY_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}


@pytest.mark.parametrize("change, key, value, needle", [
    ({"num_attention_heads": 0}, "num_attention_heads", 0, "num_attention_heads must be an integer >= 1, got 0"),
    ({"num_attention_heads": -4}, "num_attention_heads", -4, "got -4"),
    ({"hidden_size": -64}, "hidden_size", -64, "hidden_size must be an integer >= 1, got -64"),
    ({"hidden_size": 66}, "hidden_size", 66, "hidden_size (66) is not a multiple of num_attention_heads (4)"),
    ({"num_key_value_heads": 0}, "num_key_value_heads", 0, "num_key_value_heads must be"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", 3, "not a multiple of num_key_value_heads (3)"),
    ({"intermediate_size": "128"}, "intermediate_size", "128", "intermediate_size must be an integer >= 1, got '128'"),
    ({"vocab_size": True}, "vocab_size", True, "vocab_size must be"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers", 1.5, "num_hidden_layers must be"),
    ({"head_dim": 0}, "head_dim", 0, "head_dim must be"),
    ({"head_dim": 15}, "head_dim", 15, "head_dim must be even"),
    ({"max_position_embeddings": 1 << 40}, "max_position_embeddings", 1 << 40, "max_position_embeddings must be an integer in"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", 0, "rms_norm_eps must be a finite positive number"),
    ({"rope_theta": float("inf")}, "rope_theta", float("inf"), "rope_theta must be a finite positive number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "rope scaling factor", -2.0, "factor must be"),
    ({"num_hidden_layers": None}, "num_hidden_layers", None, "num_hidden_layers must be"),
])
def test_bad_hf_config_values_are_named(change, key, value, needle):
    """A config.json value that cannot describe a model: a ModelFormatError with the field and the value, before
    anything divides by it or is sized by it."""
    from lmgen.errors import ModelFormatError

    with pytest.raises(ModelFormatError) as info:
        ModelConfig.from_hf_config({**TINY_HF, **change})
    assert needle in str(info.value)
    assert info.value.key == key and info.value.value == value


def test_missing_hf_field_is_named():
    from lmgen.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="missing the required field 'hidden_size'") as info:
        ModelConfig.from_hf_config({k: v for k, v in TINY_HF.items() if k != "hidden_size"})
    assert info.value.key == "hidden_size"


def test_hf_folder_with_zero_heads_fails_at_load_and_in_the_cli(tmp_path):
    """Through the HF loader and the CLI: config.json is checked before any weight is looked for."""
    import json
    import subprocess
    import sys

    from lmgen import LLM, ModelLoadError

    (tmp_path / "config.json").write_text(json.dumps({**TINY_HF, "num_attention_heads": 0}))
    with pytest.raises(ModelLoadError, match="config.json: num_attention_heads must be an integer >= 1, got 0"):
        LLM(str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "lmgen.cli", "generate", "hi", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmgen: error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert str(tmp_path) in errors[0] and "num_attention_heads" in errors[0] and "got 0" in errors[0]
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="config.json holds a JSON list, not an object"):
        LLM(str(tmp_path))
