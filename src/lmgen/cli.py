"""lmgen command line: generate | chat | tokenize | serve | inspect | doctor. Every error, usage errors included, prints one
`lmgen: error: ...` line on stderr and exits 1."""

from __future__ import annotations

import argparse
import sys
import time

from lmgen.cli_args import Parser, add_model_args, add_sampling_args, sampling_params_from_args, speculative_from_args
from lmgen.cli_structured import add_structured_args


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
    add_model_args(g)
    add_sampling_args(g, 256)
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
    add_model_args(c)
    add_sampling_args(c, 512)
    c.set_defaults(func=cmd_chat)

    t = sub.add_parser("tokenize", help="show the token ids and pieces of a text")
    t.add_argument("text", help="text to tokenize ('-' reads stdin)")
    t.add_argument("--model", "-m", default=None)
    t.add_argument("--no-special", action="store_true", help="do not add BOS/special tokens")
    t.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_args(s)
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
    add_model_args(i)
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
