"""Model loaders: a GGUF file or a Hugging Face folder -> ModelConfig, weights, tokenizer (LoadedModel)."""

from __future__ import annotations

from pathlib import Path

from lmgen.errors import ModelLoadError
from lmgen.loader.gguf import load_gguf
from lmgen.loader.hf import load_hf_folder
from lmgen.loader.loaded import LoadedModel


def load_model(path: str | Path) -> LoadedModel:
    """Dispatches on what `path` is: a .gguf file, or a folder with config.json."""
    path = Path(path)
    if path.is_dir():
        return load_hf_folder(path)
    if path.is_file():
        return load_gguf(path)
    raise ModelLoadError(f"model path {str(path)!r} does not exist")
