"""Model loaders: a GGUF file or a Hugging Face folder -> ModelConfig, weights, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lmgen.loader.errors import ModelLoadError

if TYPE_CHECKING:  # not at run time: lmgen.config imports lmgen.errors, which imports lmgen.loader.errors
    from lmgen.config import ModelConfig


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


def load_model(path: str | Path) -> LoadedModel:
    """Dispatches on what `path` is: a .gguf file, or a folder with config.json."""
    path = Path(path)
    if path.is_dir():
        from lmgen.loader.hf import load_hf_folder

        return load_hf_folder(path)
    if path.is_file():
        from lmgen.loader.gguf import load_gguf

        return load_gguf(path)
    raise ModelLoadError(f"model path {str(path)!r} does not exist")


__all__ = ["LoadedModel", "ModelLoadError", "load_model", "load_tokenizer"]
