"""Writes a transformers Qwen3 / GPT-2 model as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does
(tensor names, GPT-2's Conv1D weights transposed and its tied output written out, metadata keys), with the
embedded SmolLM2 GGUF's vocabulary: no real small Qwen3 or GPT-2 GGUF is available offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf

_QWEN3_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _copy_vocab(writer: gguf.GGUFWriter, vocab_gguf: Path) -> None:
    reader = gguf.GGUFReader(vocab_gguf)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        writer.add_string(key, reader.fields[key].contents())
    writer.add_token_list(reader.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(reader.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(reader.fields["tokenizer.ggml.merges"].contents())
    for key in ("bos_token_id", "eos_token_id"):
        writer.add_uint32(f"tokenizer.ggml.{key}", int(reader.fields[f"tokenizer.ggml.{key}"].contents()))


def _tensor_name(arch: str, hf_name: str, tied: bool) -> str | None:
    parts = hf_name.split(".")
    if arch == "qwen3":
        if hf_name == "model.embed_tokens.weight":
            return "token_embd.weight"
        if hf_name == "model.norm.weight":
            return "output_norm.weight"
        if hf_name == "lm_head.weight":
            return None if tied else "output.weight"
        layer, rest = parts[2], ".".join(parts[3:-1])
        return f"blk.{layer}.{_QWEN3_BLOCK[rest]}.{parts[-1]}"
    names = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    if hf_name in names:
        return names[hf_name]
    if hf_name == "lm_head.weight" or hf_name.endswith(".attn.bias") or hf_name.endswith(".attn.masked_bias"):
        return None
    layer, rest = parts[2], ".".join(parts[3:-1])
    return f"blk.{layer}.{_GPT2_BLOCK[rest]}.{parts[-1]}"


def write_gguf(model, arch: str, path: Path, vocab_gguf: Path) -> Path:
    """model: a transformers Qwen3ForCausalLM (arch "qwen3") or GPT2LMHeadModel ("gpt2"), float32 tensors."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny random {arch}")
    if arch == "qwen3":
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    else:
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    _copy_vocab(writer, vocab_gguf)
    tied = bool(cfg.tie_word_embeddings)
    for name, tensor in model.state_dict().items():
        gguf_name = _tensor_name(arch, name, tied)
        if gguf_name is None:
            continue
        data = tensor.detach().float().numpy()
        if arch == "gpt2" and name.endswith(_CONV1D):
            data = data.T  # Conv1D stores (in, out)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data))
        if arch == "gpt2" and gguf_name == "token_embd.weight":  # convert_hf_to_gguf writes the tied output too
            writer.add_tensor("output.weight", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
