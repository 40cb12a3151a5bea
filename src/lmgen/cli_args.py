"""The command line's options: the flags every command shares (model, sampling), and how they become an LLM's and a
request's settings (SamplingParams, the speculative config)."""

from __future__ import annotations

import argparse

from lmgen.sampling.params import PRESETS


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error habit: one `lmgen: error:` line and exit 1, instead of usage + exit 2."""

    def error(self, message: str):
        self.exit(1, f"lmgen: error: {message} (see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, help="a .gguf file, a Hugging Face folder, or 'smollm2' (the embedded default)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    g.add_argument("--quantization", default="auto",
                   help="auto (default: GGUF Q4_0/Q4_1/Q8_0/K-quant blocks stay packed) | none (dequantize to --dtype) | "
                        "int8 | int4 (also quantize float checkpoints at load)")
    g.add_argument("--context-length", type=int, default=None, help="cap the context window below the model's (tokens)")
    g.add_argument("--no-thinking", action="store_true",
                   help="chat prompts with enable_thinking=false (Qwen3-style templates; refused where the template has "
                        "no such switch); a server request's chat_template_kwargs overrides it")
    g.add_argument("--chat-template", default=None, help="builtin name (llama3, llama3.1, llama2, chatml, mistral, gemma), a .jinja file, or template text")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the layers (minutes of compiling at the first steps; meant for CUDA, slower than "
                        "the default fused kernels on CPU: see benchmarks/RESULTS.md)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the matmuls and kernels (default: PyTorch's, the physical cores); fewer on a busy machine")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="auto | float32 | float16 | bfloat16 | int8: the KV cache's element type (auto: float16 for a "
                        "float32 model on CPU, half the memory and bytes read per token; int8: llama.cpp's q8_0 "
                        "rows, about half again; float32: exact)")
    g.add_argument("--no-batch-invariant", action="store_true",
                   help="allow results to depend on what shares a step (faster float prefill; see README)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N processes (torch.distributed; under torchrun, ranks > 0 become its "
                        "workers); the model's heads must divide by N")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the model's layers into N stages, one process each (torch.distributed send/recv)")


    sp = p.add_argument_group("speculative decoding (exact: greedy output is token-identical)")
    sp.add_argument("--speculative", default=None, metavar="METHOD",
                    help="ngram (prompt lookup) | self (the packed weights draft for a float target: with --quantization "
                         "none) | draft (another model with the same tokenizer, --draft-model)")
    sp.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K", help="tokens proposed per step (default: 8 ngram, 6 self, 4 draft)")
    sp.add_argument("--draft-model", default=None, metavar="PATH", help="the draft model of --speculative draft")


def speculative_from_args(args: argparse.Namespace) -> dict | None:
    """--speculative / --num-speculative-tokens / --draft-model -> LLM's `speculative` dict (checked by LLM)."""
    if args.speculative is None:
        for flag, value in (("--num-speculative-tokens", args.num_speculative_tokens), ("--draft-model", args.draft_model)):
            if value is not None:
                raise ValueError(f"{flag} needs --speculative (got {flag} {value} alone)")
        return None
    spec: dict = {"method": args.speculative}
    if args.num_speculative_tokens is not None:
        spec["num_tokens"] = args.num_speculative_tokens
    if args.draft_model is not None:
        spec["model"] = args.draft_model
    return spec


def logit_bias_arg(text: str) -> dict[int, float]:
    out = {}
    for part in filter(None, text.split(",")):
        tok, _, bias = part.partition("=")
        try:
            out[int(tok)] = float(bias)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want TOKEN_ID=BIAS[,...], got {part!r}") from None
    return out


def token_ids_arg(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integer token ids, got {text!r}") from None


def add_sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    presets = "; ".join(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in PRESETS.items())
    g = p.add_argument_group("sampling (order: penalties -> logit_bias -> temperature -> top-k -> top-p -> min-p -> draw)")
    g.add_argument("--preset", choices=sorted(PRESETS), help=f"recommended settings ({presets}); explicit flags override it")
    g.add_argument("--max-tokens", type=int, default=default_max_tokens, help=f"tokens to generate (default {default_max_tokens})")
    g.add_argument("--temperature", "-t", type=float, help="0 = greedy; low (0.2) for facts, high (1.0+) for creative text (default 1.0)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="keep the smallest set with cumulative probability >= p (1 = off)")
    g.add_argument("--min-p", type=float, help="keep tokens with probability >= min_p * the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages tokens already in prompt or output (transformers)")
    g.add_argument("--presence-penalty", type=float, help="-2..2, OpenAI: penalise tokens already generated")
    g.add_argument("--frequency-penalty", type=float, help="-2..2, OpenAI: penalise by how often a token was generated")
    g.add_argument("--logit-bias", type=logit_bias_arg, help="TOKEN_ID=BIAS[,...] added to the logits")
    g.add_argument("--min-tokens", type=int, help="suppress EOS/stop ids until this many tokens were generated")
    g.add_argument("--n", type=int, help="independent samples per prompt")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--logprobs", type=int, help="print the top-N candidates with probabilities at each generated token")
    g.add_argument("--stop", action="append", help="stop string (repeatable); never printed")
    g.add_argument("--stop-token-ids", type=token_ids_arg, help="comma-separated token ids that end generation")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past EOS")
    g.add_argument("--beam-width", type=int, help="beam search with this many beams (deterministic)")
    g.add_argument("--length-penalty", type=float, help="beam search: score = logprob / length**length_penalty")
    g.add_argument("--early-stopping", action="store_true", default=None, help="beam search: stop when beam_width hypotheses finished")


_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias", "min_tokens", "n", "seed", "logprobs", "stop", "stop_token_ids",
                    "ignore_eos", "beam_width", "length_penalty", "early_stopping")


def sampling_params_from_args(args: argparse.Namespace):
    from lmgen.cli_structured import structured_from_args
    from lmgen.sampling.params import SamplingParams

    base = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    for name in _SAMPLING_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            base[name] = value
    base["structured"] = structured_from_args(args)
    return SamplingParams(**base)
