"""Whether a model can be split over `size` tensor-parallel ranks, said before any process starts."""

from __future__ import annotations

from lmgen.errors import ParallelConfigError

MAX_RANKS = 64
# the families whose model file implements tensor / pipeline parallelism (models/llama.py); Gemma 3, Qwen3 and
# GPT-2 run in one process only
PARALLEL_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def check_family(config, size: int, param: str) -> None:
    """A ParallelConfigError for size > 1 on a family without a parallel implementation."""
    if size > 1 and config.architecture not in PARALLEL_ARCHITECTURES:
        raise ParallelConfigError(f"{param} {size}: {config.architecture} runs in one process only (parallelism is "
                                  f"implemented for {', '.join(PARALLEL_ARCHITECTURES)})", param=param, value=size)


def check_tensor_parallel(config, size: object) -> int:
    """`size` if the model's heads, KV heads, MLP and vocabulary split evenly over it; else a ParallelConfigError
    that says which does not and which sizes do."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_RANKS:
        raise ParallelConfigError(f"tensor_parallel_size must be an integer in [1, {MAX_RANKS}], got {size!r}",
                                  param="tensor_parallel_size", value=size)
    check_family(config, size, "tensor_parallel_size")
    problems = split_problems(config, size)
    if problems:
        valid = [n for n in range(1, min(MAX_RANKS, config.num_heads) + 1) if not split_problems(config, n)]
        raise ParallelConfigError(f"tensor_parallel_size {size} does not divide {' or '.join(problems)}; the sizes "
                                  f"that split this model evenly: {', '.join(map(str, valid))}",
                                  param="tensor_parallel_size", value=size)
    return size


def split_problems(config, size: int) -> list[str]:
    """What of the model `size` ranks cannot share evenly (empty: it splits)."""
    kv, problems = config.num_kv_heads, []
    if config.num_heads % size:
        problems.append(f"the {config.num_heads} attention heads")
    if kv % size and size % kv:
        problems.append(f"the {kv} KV heads (neither divides the other)")
    if config.intermediate_size % size:
        problems.append(f"the MLP width {config.intermediate_size}")
    if config.hidden_size % size:
        problems.append(f"the hidden size {config.hidden_size}")
    if config.vocab_size % size:
        problems.append(f"the vocabulary of {config.vocab_size}")
    return problems


def check_pipeline_parallel(config, size: object) -> int:
    """`size` if it is a stage count the model's layers allow."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(MAX_RANKS, config.num_layers):
        raise ParallelConfigError(f"pipeline_parallel_size must be an integer in [1, {min(MAX_RANKS, config.num_layers)}] "
                                  f"(the model has {config.num_layers} layers), got {size!r}",
                                  param="pipeline_parallel_size", value=size)
    check_family(config, size, "pipeline_parallel_size")
    return size
