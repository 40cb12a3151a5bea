"""lmgen command line: generate | chat | tokenize | serve | inspect | doctor. Every error, usage errors included, prints one
`lmgen: error: ...` line on stderr and exits 1."""

from __future__ import annotations

import argparse
import sys
import time

from lmgen.cli_structured import add_structured_args
from lmgen.sampling.params import PRESETS


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error habit: one `lmgen: error:` line and exit 1, instead of usage + exit 2."""

    def error(self, message: str):
        self.exit(1, f"lmgen: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
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
                   help="auto | float32 | float16 | bfloat16: the KV cache's element type (auto: float16 for a float32 "
                        "model on CPU, half the memory and bytes read per token; float32: exact)")
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
    sp.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K", help="tokens proposed per step (default 4)")
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


def _logit_bias(text: str) -> dict[int, float]:
    out = {}
    for part in filter(None, text.split(",")):
        tok, _, bias = part.partition("=")
        try:
            out[int(tok)] = float(bias)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want TOKEN_ID=BIAS[,...], got {part!r}") from None
    return out


def _token_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integer token ids, got {text!r}") from None


def _add_sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
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
    g.add_argument("--logit-bias", type=_logit_bias, help="TOKEN_ID=BIAS[,...] added to the logits")
    g.add_argument("--min-tokens", type=int, help="suppress EOS/stop ids until this many tokens were generated")
    g.add_argument("--n", type=int, help="independent samples per prompt")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--logprobs", type=int, help="print the top-N candidates with probabilities at each generated token")
    g.add_argument("--stop", action="append", help="stop string (repeatable); never printed")
    g.add_argument("--stop-token-ids", type=_token_ids, help="comma-separated token ids that end generation")
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



def load_llm(args: argparse.Namespace):
    """Builds the LLM with a progress bar on stderr while the layers load."""
    from tqdm import tqdm

    from lmgen.llm import LLM

    bar = tqdm(total=None, desc="loading model", unit="layer", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    try:
        return LLM(args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                   context_length=args.context_length, chat_template=args.chat_template, threads=args.threads,
                   chat_template_kwargs={"enable_thinking": False} if getattr(args, "no_thinking", False) else None,
                   compile=args.compile, batch_invariant=not args.no_batch_invariant, progress=progress,
                   tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
                   speculative=speculative_from_args(args), kv_cache_dtype=args.kv_cache_dtype)
    finally:
        bar.close()


def cmd_generate(args: argparse.Namespace) -> int:
    from lmgen.cli_report import completion_header, print_logprobs, print_stats

    params = sampling_params_from_args(args)
    llm = load_llm(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        prompt = llm.render_chat(([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}])
    before = _copy_stats(llm)
    t0 = time.perf_counter()
    # stdout carries the generated text only (a newline after it only at a terminal; the prompt first with --echo);
    # per-completion headers and logprobs go to stderr
    newline = "\n" if sys.stdout.isatty() else ""
    if args.echo:
        print(prompt, end="", flush=True)
    if params.n == 1 and params.beam_width == 1 and not args.no_stream:
        last, token_ids, logprobs = None, [], []
        for so in llm.stream_outputs(prompt, params):
            print(so.delta_text, end="", flush=True)
            token_ids.extend(so.new_token_ids)
            logprobs.extend(so.new_logprobs or ())
            last = so
        print(end=newline, flush=True)
        if last is not None and params.logprobs is not None:
            print_logprobs(llm, token_ids, logprobs)
        n_prompt = last.num_prompt_tokens if last else 0
    else:
        result = llm.generate(prompt, params)[0]
        for c in result.outputs:
            print(completion_header(c, params), file=sys.stderr, flush=True)
            print(c.text, end="\n" if len(result.outputs) > 1 else newline, flush=True)
            if params.logprobs is not None:
                print_logprobs(llm, c.token_ids, c.logprobs)
        n_prompt = len(result.prompt_token_ids)
    if args.stats:
        print_stats(llm, n_prompt, before, time.perf_counter() - t0)
    return 0


def _copy_stats(llm):
    import copy

    return copy.copy(llm.engine.stats)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from lmgen.loader import load_model
    from lmgen.loader.resolve import resolve_model

    # Only the tokenizer is needed: load_model reads weights lazily (memory-mapped), so this is quick.
    tok = load_model(resolve_model(args.model)).tokenizer
    text = sys.stdin.read() if args.text == "-" else args.text
    ids = tok.encode(text, add_special_tokens=not args.no_special)
    pieces = tok.convert_ids_to_tokens(ids)
    print(f"{len(ids)} tokens")
    print("ids:", ids)
    print("      id  piece (vocabulary form)  text ('\ufffd' = part of a multi-byte UTF-8 character)")
    for i, p in zip(ids, pieces):
        print(f"{i:>8}  {p!r:<24} {tok.decode([i])!r}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmgen.chat.repl import ChatREPL

    params = sampling_params_from_args(args)
    retriever = None
    if args.docs:
        from lmgen.chat.retrieval import Retriever

        if args.docs_k < 1:
            raise ValueError(f"--docs-k must be >= 1, got {args.docs_k}")
        retriever = Retriever.from_paths(args.docs)
    llm = load_llm(args)
    return ChatREPL(llm, params, system=args.system, stream=not args.no_stream, stats=args.stats,
                    retriever=retriever, docs_k=args.docs_k).run(sys.stdin)


def check_port_free(host: str, port: int) -> None:
    """Raises OSError naming host:port when a server could not listen there (checked before the model loads)."""
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise OSError(f"--host {host!r} does not resolve: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? choose --port)") from None


def cmd_serve(args: argparse.Namespace) -> int:
    check_port_free(args.host, args.port)
    from lmgen.server.app import serve

    return serve(args, load_llm(args))


def cmd_inspect(args: argparse.Namespace) -> int:
    """`lmgen serve` on loopback, announcing the inspector page's URL (port 0: a free one)."""
    import socket

    if args.port == 0:
        with socket.socket() as s:
            s.bind((args.host, 0))
            args.port = s.getsockname()[1]
    check_port_free(args.host, args.port)
    from lmgen.server.app import serve

    llm = load_llm(args)
    key = f"#key={args.api_key}" if args.api_key else ""
    print(f"lmgen inspector: http://{args.host}:{args.port}/inspect{key}", flush=True)
    return serve(args, llm)


def cmd_doctor(args: argparse.Namespace) -> int:
    from lmgen.doctor import run

    return run()


def build_parser() -> argparse.ArgumentParser:
    from lmgen.doctor import lmgen_version

    parser = Parser(prog="lmgen", description="Text generation with LLaMA-family models (GGUF or Hugging Face folders).")
    parser.add_argument("--version", action="version", version=f"lmgen {lmgen_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="complete a prompt (streams to the terminal)")
    g.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user message")
    g.add_argument("--system", default=None, help="system prompt (with --chat)")
    g.add_argument("--stats", action="store_true", help="print prompt tokens, prefill and decode tok/s, memory")
    g.add_argument("--no-stream", action="store_true", help="print the result at the end instead of streaming")
    g.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    _add_model_args(g)
    _add_sampling_args(g, 256)
    add_structured_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (REPL); piped stdin: one user turn per line")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--stats", action="store_true", help="print prefill/decode figures after each answer")
    c.add_argument("--no-stream", action="store_true", help="print each answer when complete")
    c.add_argument("--docs", action="append", metavar="PATH",
                   help="retrieval-augmented chat: .txt/.md files or folders (repeatable); each question's best-matching "
                        "passages (BM25) join that turn's system prompt")
    c.add_argument("--docs-k", type=int, default=3, help="passages retrieved per question (default 3)")
    _add_model_args(c)
    _add_sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)

    t = sub.add_parser("tokenize", help="show the token ids and pieces of a text")
    t.add_argument("text", help="text to tokenize ('-' reads stdin)")
    t.add_argument("--model", "-m", default=None)
    t.add_argument("--no-special", action="store_true", help="do not add BOS/special tokens")
    t.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--max-num-seqs", type=int, default=32, help="most sequences decoded together")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 503")
    s.add_argument("--max-n", type=int, default=128, help="most completions (n) or beams one request may ask for; more get 400")
    s.add_argument("--allowed-origins", type=lambda v: [o.strip() for o in v.split(",") if o.strip()], default=None,
                   help="comma-separated browser origins allowed by CORS (default: none)")
    s.add_argument("--access-log", action="store_true", help="log one line per HTTP request (method, path, status)")
    s.add_argument("--served-model-name", default=None, help="model name clients use (default: the model's)")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a `chat_template` (Jinja text, never a path) in chat requests (default: refused)")
    s.add_argument("--max-request-bytes", type=int, default=None,
                   help="request bodies over this many bytes get 413 (default 4 MiB)")
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser("inspect", help="serve the generation inspector (a browser page) and print its URL")
    _add_model_args(i)
    i.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    i.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    i.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (the printed URL carries it)")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("doctor", help="report versions, CPU features, the C++ kernels and threads (exit 1: no kernels)")
    d.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `lmgen`
        parser.print_help()
        return 0
    try:
        if getattr(args, "tensor_parallel_size", 1) * getattr(args, "pipeline_parallel_size", 1) > 1:
            from lmgen.parallel.worker import serve_torchrun_worker

            if serve_torchrun_worker(args.device):  # a rank > 0 under torchrun: a worker of rank 0's engine
                return 0
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"lmgen: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
