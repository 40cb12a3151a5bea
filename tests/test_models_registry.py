"""The model registry and the per-parameter weight loaders: architectures resolve to family classes, fused
QKV / gate-up layers are assembled from their checkpoint shards, and tensors are read only when their layer is
built, each once, in whatever order the loader yields them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmgen.config import ModelConfig
from lmgen.errors import UnsupportedModelError
from lmgen.layers.attention import AttentionMetadata
from lmgen.loader import load_model
from lmgen.models.base import CausalLM
from lmgen.models.registry import ARCHITECTURES, GGUF_ARCHITECTURES, build_model, model_class


def test_every_architecture_resolves_to_a_family_class():
    for arch in ARCHITECTURES:
        assert issubclass(model_class(arch), CausalLM)
    assert set(GGUF_ARCHITECTURES.values()) <= set(ARCHITECTURES)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        model_class("NoSuchForCausalLM")


class CountingTensor:
    """A lazy checkpoint handle that counts how often its bytes are read."""

    def __init__(self, tensor: torch.Tensor, reads: dict, name: str):
        self.tensor, self.reads, self.name, self.shape = tensor, reads, name, tuple(tensor.shape)

    def materialize(self) -> torch.Tensor:
        self.reads[self.name] = self.reads.get(self.name, 0) + 1
        return self.tensor


@pytest.mark.parametrize("kind", ["qwen2", "llama_bias"])
def test_fused_layers_are_assembled_from_their_shards(kind, tiny_model_dirs):
    folder = tiny_model_dirs[kind]
    state = load_file(str(folder / "model.safetensors"))
    loaded = load_model(folder)
    reads: dict = {}
    # the loader's order reversed: a fused layer's shards arrive v, k, q and the model must not care
    handles = [(name, CountingTensor(t, reads, name)) for name, t in reversed(list(state.items()))]
    model = build_model(loaded.config, iter(handles), torch.float32, "cpu", "none")
    assert reads and all(n == 1 for n in reads.values()) and set(reads) <= set(state)  # each tensor read once
    p = "model.layers.1."
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    qkv = torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, qkv)  # (q + 2 kv, hidden): q, k, v stacked in that order
    assert torch.equal(attn.qkv_proj.bias, torch.cat([state[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]))
    assert torch.equal(model.layers[0].input_layernorm.weight, state["model.layers.0.input_layernorm.weight"])


def test_nothing_is_read_before_the_layers_are_built(tiny_model_dirs):
    folder = tiny_model_dirs["qwen2"]
    state = load_file(str(folder / "model.safetensors"))
    loaded = load_model(folder)
    reads: dict = {}
    from lmgen.models.registry import model_class as family
    from lmgen.layers.weight_slots import LayerFactory

    model = family(loaded.config.architecture)(loaded.config, LayerFactory(torch.float32, torch.device("cpu")))
    model.load_weights((n, CountingTensor(t, reads, n)) for n, t in state.items())
    assert reads == {}  # handles only: the bytes are read when a layer is built
    built = []
    model.finalize(lambda: built.append(dict(reads)))
    assert len(built) == loaded.config.num_layers
    # one decoder layer at a time: after the first layer is built, no tensor of the second has been read
    assert not any(n.startswith("model.layers.1.") for n in built[0])


def test_a_model_is_built_from_its_config_alone_on_the_meta_device():
    cfg = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=100, hidden_size=32, intermediate_size=64,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True)
    names = {"model.embed_tokens.weight": (100, 32), "model.norm.weight": (32,), "lm_head.weight": (100, 32)}
    for i in range(3):
        p = f"model.layers.{i}."
        names |= {p + "self_attn.q_proj.weight": (32, 32), p + "self_attn.k_proj.weight": (16, 32),
                  p + "self_attn.v_proj.weight": (16, 32), p + "self_attn.q_proj.bias": (32,),
                  p + "self_attn.k_proj.bias": (16,), p + "self_attn.v_proj.bias": (16,),
                  p + "self_attn.o_proj.weight": (32, 32), p + "mlp.gate_proj.weight": (64, 32),
                  p + "mlp.up_proj.weight": (64, 32), p + "mlp.down_proj.weight": (32, 64),
                  p + "input_layernorm.weight": (32,), p + "post_attention_layernorm.weight": (32,)}
    weights = [(n, torch.empty(s, device="meta")) for n, s in names.items()]
    model = build_model(cfg, weights, torch.float32, "meta")
    expected = sum(torch.Size(s).numel() for s in names.values())
    assert sum(p.numel() for p in model.parameters()) == expected
    meta = AttentionMetadata(slot_mapping=torch.arange(3, device="meta"), query_index=None, output_index=None,
                             kv_index=torch.zeros(1, 3, dtype=torch.long, device="meta"), mask=None, causal=True)
    caches = [(torch.empty(2, 2, 4, 8, device="meta"),) * 2 for _ in range(3)]  # (blocks, kv_heads, block_size, head_dim)
    hidden = model(torch.zeros(3, dtype=torch.long, device="meta"), torch.arange(3, device="meta"), caches, meta)
    assert model.compute_logits(hidden).shape == (3, 100)
