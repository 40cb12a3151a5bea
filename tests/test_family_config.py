"""ModelConfig for Gemma 3, Qwen3 and GPT-2: read from transformers' own configs (AutoConfig.for_model, as
save_pretrained writes them) and from the real Gemma 3 GGUF's metadata; bad values refused naming the field."""

from __future__ import annotations

import pytest

from lmgen.config import ModelConfig
from lmgen.errors import ModelFormatError, UnsupportedModelError


def hf_dict(model_type: str, **kw) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kw).to_dict()


def test_gemma3_hf_config_layer_pattern_rope_bases_and_scalars():
    d = hf_dict("gemma3_text", num_hidden_layers=7, sliding_window=8, query_pre_attn_scalar=64, head_dim=32,
                final_logit_softcapping=30.0, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=1, vocab_size=300)
    d["architectures"] = ["Gemma3ForCausalLM"]
    c = ModelConfig.from_hf_config(d)
    assert c.architecture == "Gemma3ForCausalLM" and c.head_dim == 32 and c.num_kv_heads == 1
    assert c.layer_types == tuple(d["layer_types"])
    assert [c.layer_window(i) for i in range(7)] == [8, 8, 8, 8, 8, None, 8]
    assert [c.layer_rope_theta(i) for i in (0, 5)] == [10000.0, 1e6]
    assert (c.norm_type, c.hidden_act, c.qk_norm, c.sandwich_norm) == ("rms_one_plus", "gelu_tanh", True, True)
    assert c.embedding_scale == pytest.approx(8.0) and c.query_pre_attn_scalar == 64.0
    assert c.final_logit_softcapping == 30.0 and c.attn_logit_softcapping is None and c.tie_word_embeddings


def test_gemma3_transformers4_style_config():
    """transformers 4.x: rope_theta + rope_local_base_freq, and a sliding_window_pattern instead of layer_types."""
    d = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 32, "rope_theta": 500000.0, "rope_local_base_freq": 20000.0, "sliding_window": 16,
         "sliding_window_pattern": 2, "hidden_activation": "gelu_pytorch_tanh"}
    c = ModelConfig.from_hf_config(d)
    assert c.layer_types == ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    assert [c.layer_rope_theta(i) for i in range(2)] == [20000.0, 500000.0]
    assert c.query_pre_attn_scalar == 32.0  # absent: head_dim


def test_qwen3_and_gpt2_hf_configs():
    q = ModelConfig.from_hf_config({**hf_dict("qwen3", head_dim=40), "architectures": ["Qwen3ForCausalLM"]})
    assert q.qk_norm and q.head_dim == 40 and not q.attention_bias and q.norm_type == "rms" and q.layer_window(0) is None
    g = ModelConfig.from_hf_config({**hf_dict("gpt2", n_embd=96, n_layer=3, n_head=4), "architectures": ["GPT2LMHeadModel"]})
    assert (g.hidden_size, g.num_layers, g.num_heads, g.head_dim, g.intermediate_size) == (96, 3, 4, 24, 384)
    assert (g.norm_type, g.hidden_act, g.mlp_gated, g.position_embedding) == ("layer", "gelu_tanh", False, "learned")
    assert g.attention_bias and g.o_bias and g.mlp_bias and g.max_position_embeddings == 1024
    assert g.rms_norm_eps == 1e-5


@pytest.mark.parametrize("change, match", [
    ({"use_sliding_window": True}, "use_sliding_window"),
])
def test_qwen3_refusals(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf_config({**hf_dict("qwen3"), "architectures": ["Qwen3ForCausalLM"], **change})


@pytest.mark.parametrize("change, error, match", [
    ({"layer_types": ["full_attention", "bogus"]}, ModelFormatError, "layer_types"),
    ({"hidden_activation": "relu"}, UnsupportedModelError, "hidden_activation 'relu'"),
    ({"final_logit_softcapping": -3.0}, ModelFormatError, "final_logit_softcapping"),
    ({"query_pre_attn_scalar": 0}, ModelFormatError, "query_pre_attn_scalar"),
    ({"use_bidirectional_attention": True}, UnsupportedModelError, "bidirectional"),
])
def test_gemma3_bad_values_are_refused_by_name(change, error, match):
    d = {**hf_dict("gemma3_text", num_hidden_layers=2, sliding_window=8), "architectures": ["Gemma3ForCausalLM"], **change}
    with pytest.raises(error, match=match):
        ModelConfig.from_hf_config(d)


def test_gpt2_unsupported_options_refused():
    d = {**hf_dict("gpt2", n_layer=2, scale_attn_by_inverse_layer_idx=True), "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf_config(d)


def test_real_gemma_gguf_metadata(gemma_gguf_path):
    from lmgen.loader.gguf_layout import read_layout

    meta = read_layout(gemma_gguf_path).metadata
    c = ModelConfig.from_gguf_metadata(meta, 262144)
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "Gemma3ForCausalLM", 18, 640, 4, 1, 256)
    assert c.sliding_window == 512 and c.rope_theta == 1e6 and c.rope_local_theta == 10000.0
    assert [i for i in range(18) if c.layer_window(i) is None] == [5, 11, 17]  # one global layer in 6
    assert c.query_pre_attn_scalar == 256.0 and c.final_logit_softcapping is None
    bad = {**meta, "gemma3.attention.sliding_window_pattern": 0}
    with pytest.raises(ModelFormatError, match="sliding_window_pattern"):
        ModelConfig.from_gguf_metadata(bad, 262144)


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as hf:
        ModelConfig.from_hf_config({"architectures": ["MambaForCausalLM"], "vocab_size": 10})
    with pytest.raises(UnsupportedModelError) as gg:
        ModelConfig.from_gguf_metadata({"general.architecture": "mamba"})
    for name in ("LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"):
        assert name in str(hf.value)
    for name in ("llama", "gemma3", "qwen3", "gpt2"):
        assert name in str(gg.value)


def test_parallelism_refused_for_the_single_process_families():
    from lmgen.errors import ParallelConfigError
    from lmgen.parallel.check import check_pipeline_parallel, check_tensor_parallel

    c = ModelConfig.from_hf_config({**hf_dict("qwen3", num_hidden_layers=2), "architectures": ["Qwen3ForCausalLM"]})
    assert check_tensor_parallel(c, 1) == 1 and check_pipeline_parallel(c, 1) == 1
    with pytest.raises(ParallelConfigError, match="Qwen3ForCausalLM runs in one process only"):
        check_tensor_parallel(c, 2)
    with pytest.raises(ParallelConfigError, match="pipeline_parallel_size 2"):
        check_pipeline_parallel(c, 2)
