"""A Hugging Face folder (config.json, *.safetensors, tokenizer.json, ...) -> ModelConfig, weights, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from lmgen.config import ModelConfig
from lmgen.errors import ModelFormatError
from lmgen.loader.loaded import LoadedModel, load_tokenizer
from lmgen.errors import ModelLoadError


def _read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.parent} has no {path.name}; a Hugging Face model folder needs it")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} holds a JSON {type(data).__name__}, not an object", key=path.name,
                               value=type(data).__name__)
    return data


def _safetensor_files(folder: Path) -> list[Path]:
    index = _read_json(folder / "model.safetensors.index.json", required=False)
    if index is not None:
        try:
            names = sorted(set(index["weight_map"].values()))
        except (KeyError, AttributeError):
            raise ModelLoadError(f"{folder / 'model.safetensors.index.json'} has no valid 'weight_map'") from None
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"shards listed in model.safetensors.index.json are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{folder} has no model.safetensors (or sharded index); only safetensors weights are supported")
    return found


class LazyTensor:
    """A safetensors tensor read only when its layer is built (lmgen.layers.weight_slots), so the peak memory of loading a
    large checkpoint (Llama-3-8B: 16 GB of bf16) is the model plus one layer, not the model twice."""

    def __init__(self, handle, name: str):
        self._handle, self.name = handle, name
        self.shape = tuple(handle.get_slice(name).get_shape())

    def materialize(self):
        return self._handle.get_tensor(self.name)


def load_hf_folder(folder: Path) -> LoadedModel:
    """Reads config + tokenizer; weights are LazyTensors over the memory-mapped safetensors files."""
    from safetensors import safe_open

    cfg = _read_json(folder / "config.json")
    gen = _read_json(folder / "generation_config.json", required=False)
    try:
        config = ModelConfig.from_hf_config(cfg, gen)
    except ModelFormatError as e:  # say which folder
        raise ModelFormatError(f"{folder}: {e}", key=e.key, value=e.value, offset=e.offset) from None
    weights: dict = {}
    total = 0
    for file in _safetensor_files(folder):
        total += file.stat().st_size
        try:
            handle = safe_open(str(file), framework="pt")
            for name in handle.keys():
                weights[name] = LazyTensor(handle, name)
        except Exception as e:  # safetensors raises SafetensorError on truncated/corrupt headers
            raise ModelLoadError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None

    from lmgen.tokenizer.tokenizer import Tokenizer

    tokenizer = load_tokenizer(folder, lambda: Tokenizer.from_hf_folder(folder))
    return LoadedModel(config, weights, tokenizer, folder, "hf", total, {"config.json": cfg})
