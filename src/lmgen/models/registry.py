"""The model registry: which class implements each architecture, and how a model is built and loaded.

Adding an architecture = a new file in lmgen/models/ (a CausalLM subclass) + an entry here.  The table names
classes by import path, so the config parser can consult it without importing (and cycling through) the models.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Callable, Iterable

import torch

from lmgen.errors import UnsupportedModelError

# HF `architectures[0]` -> "module:Class" implementing it
ARCHITECTURES = MappingProxyType({
    "LlamaForCausalLM": "lmgen.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lmgen.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "lmgen.models.llama:LlamaForCausalLM",
    "Gemma3ForCausalLM": "lmgen.models.gemma3:Gemma3ForCausalLM",
    "Qwen3ForCausalLM": "lmgen.models.qwen3:Qwen3ForCausalLM",
    "GPT2LMHeadModel": "lmgen.models.gpt2:GPT2LMHeadModel",
})

# GGUF `general.architecture` -> HF architecture name (Mistral GGUFs are mostly written as "llama")
GGUF_ARCHITECTURES = MappingProxyType({
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
})


def model_class(architecture: str) -> type:
    """The CausalLM subclass for an HF architecture name; UnsupportedModelError listing the supported ones."""
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported architecture {architecture!r}; lmgen supports "
                                    f"{', '.join(ARCHITECTURES)}")
    module, _, name = ARCHITECTURES[architecture].partition(":")
    return getattr(importlib.import_module(module), name)


def build_model(config, weights: Iterable[tuple[str, object]], dtype: torch.dtype, device: torch.device | str,
                quantization: str = "none", progress: Callable[[], None] | None = None, compile: bool = False,
                batch_invariant: bool = True, tp=None, pp=None) -> torch.nn.Module:
    """config -> modules (slots), then the named weights through the layers' loaders, then the real layers.

    quantization: "none" | "auto" | "int8" | "int4" (lmgen.layers.linear.build_linear); progress: called once per
    decoder layer built; tp: this process's lmgen.layers.parallel.TensorParallel, pp: its
    lmgen.layers.pipeline.PipelineStage (None: the whole model)."""
    from lmgen.layers.weight_slots import LayerFactory

    factory = LayerFactory(dtype, torch.device(device), quantization, bool(batch_invariant), tp, pp)
    model = model_class(config.architecture)(config, factory, compile=compile)
    model.load_weights(weights)
    model.finalize(progress)
    return model
