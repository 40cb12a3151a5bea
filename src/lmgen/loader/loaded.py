"""What a loader produces (LoadedModel) and the tokenizer-loading guard every loader shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmgen.config import ModelConfig
from lmgen.errors import ModelLoadError


@dataclass
class LoadedModel:
    """What a loader hands the engine: the config, weights by Hugging Face name, and the tokenizer."""

    config: ModelConfig
    weights: dict[str, Any]  # HF tensor name -> torch.Tensor | PackedTensor
    tokenizer: Any  # lmgen.tokenizer.tokenizer.Tokenizer
    path: Path
    format: str  # "gguf" | "hf"
    file_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every end token the tokenizer knows (generation_config lists, <|eot_id|>, <|im_end|>...) ends generation
        extra = getattr(self.tokenizer, "eos_token_ids", None) or ()
        self.config.eos_token_ids = tuple(sorted(set(self.config.eos_token_ids) | set(extra)))


def load_tokenizer(where: Path, factory: Callable[[], Any]) -> Any:
    """Runs a Tokenizer constructor, turning its ValueError into a ModelLoadError that names the model."""
    try:
        return factory()
    except ValueError as e:
        raise ModelLoadError(f"{where}: cannot load the tokenizer: {e}") from None
