"""Builds an engine's Speculator from a SpeculativeConfig: loads the draft model ("draft"), or the target's own
file packed ("self"), and refuses a draft whose vocabulary differs from the target's."""

from __future__ import annotations

from pathlib import Path

import torch

from lmgen.errors import SpeculativeConfigError
from lmgen.models.registry import build_model
from lmgen.loader import load_model
from lmgen.loader.loaded import LoadedModel
from lmgen.loader.resolve import resolve_model
from lmgen.spec.config import SpeculativeConfig
from lmgen.spec.draft import DraftProposer
from lmgen.spec.speculator import Speculator


def build_speculator(config: SpeculativeConfig | None, target: LoadedModel, quantization: str, dtype: torch.dtype,
                     device: torch.device, num_blocks: int, block_size: int, batch_invariant: bool) -> Speculator | None:
    """The Speculator for `config` (None: no speculation). `target` is the loaded target (its tokenizer and path)."""
    if config is None:
        return None
    if config.method == "ngram":
        return Speculator(config)
    if config.method == "self":
        if quantization != "none":
            raise SpeculativeConfigError(
                f"speculative method 'self' drafts with the packed weights for a float target: load the target with "
                f"quantization='none' (got {quantization!r})", param="quantization", value=quantization)
        path = target.path
        # GGUF: its packed blocks; a float checkpoint: quantized to int8 at load
        draft_quant = "auto" if target.format == "gguf" else "int8"
    else:
        path = Path(resolve_model(config.model))
        draft_quant = "auto"
    loaded = load_model(path)
    check_vocab(target, loaded, config.model or str(path))
    model = build_model(loaded.config, loaded.weights.items(), dtype, device, draft_quant, None, False, batch_invariant)
    loaded.weights = {}
    return Speculator(config, DraftProposer(model, num_blocks, block_size))


def check_vocab(target: LoadedModel, draft: LoadedModel, name: str) -> None:
    """The draft must spell every token id as the target does (the proposals are token ids)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    same = tv == dv and len(target.tokenizer) == len(draft.tokenizer)
    if same:
        ids = list(range(len(target.tokenizer)))
        same = target.tokenizer.convert_ids_to_tokens(ids) == draft.tokenizer.convert_ids_to_tokens(ids)
    if not same:
        raise SpeculativeConfigError(
            f"draft model {name!r} has a different vocabulary from the target ({dv} vs {tv} ids, or other tokens): "
            f"a draft must use the target's tokenizer", param="speculative.model", value=name)
