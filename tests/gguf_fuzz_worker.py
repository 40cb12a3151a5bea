"""Loads each GGUF file named on stdin in a forked child with a memory ceiling and a time limit, and prints one
JSON line per file: how it ended (a working model, an error and its type, a crash, a hang) and the child's peak RSS.

Run by tests/test_gguf_fuzz.py as `python tests/gguf_fuzz_worker.py MEMORY_MIB TIMEOUT_S PARALLEL` with a JSON list
of paths on stdin (PARALLEL children at a time). lmgen and torch are imported once, here; each file is tried in a fork (cheap, and a file that made
the loader loop or allocate without bound is killed without taking the others with it).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _try(path: str) -> dict:
    """In the child: load the model, generate two tokens greedily; or the error the attempt ended in."""
    from lmgen import LLM, ModelLoadError, SamplingParams, UnsupportedModelError

    try:
        llm = LLM(path, kv_cache_tokens=256, threads=1)
        out = llm.generate("Hello", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
        return {"outcome": "ok", "tokens": len(out.outputs[0].token_ids)}
    except (ModelLoadError, UnsupportedModelError) as e:
        return {"outcome": "error", "type": type(e).__name__, "message": str(e),
                "fields": {k: repr(getattr(e, k, None)) for k in ("key", "value", "offset")}}
    except BaseException as e:  # anything else is what the fuzz test exists to find
        return {"outcome": "crash", "type": type(e).__name__, "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]}


def _child(path: str, memory: int, out_fd: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    try:
        result = _try(path)
    except BaseException as e:  # noqa: BLE001 - even a failure to report must be reported
        result = {"outcome": "crash", "type": type(e).__name__, "message": str(e)[:2000]}
    os.write(out_fd, json.dumps(result).encode())
    os.close(out_fd)
    os._exit(0)


class _Child:
    """One file being tried in a forked child; `poll` collects its report and ends it past the time limit."""

    def __init__(self, path: str, extra_memory: int):
        self.path, self.chunks, self.start = path, [], time.monotonic()
        read_fd, write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read_fd)
            _child(path, _vm_bytes() + extra_memory, write_fd)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.fd = read_fd

    def _drain(self) -> None:
        try:
            while chunk := os.read(self.fd, 1 << 16):
                self.chunks.append(chunk)
        except BlockingIOError:
            pass

    def poll(self, timeout: float) -> dict | None:
        """The result once the child has ended (killed first if it ran past `timeout`), else None."""
        self._drain()
        done, status, usage = os.wait4(self.pid, os.WNOHANG)
        hung = False
        if not done:
            if time.monotonic() - self.start <= timeout:
                return None
            os.kill(self.pid, signal.SIGKILL)
            hung = True
            _, status, usage = os.wait4(self.pid, 0)
        self._drain()
        os.close(self.fd)
        if hung:
            result = {"outcome": "hang"}
        elif self.chunks:
            result = json.loads(b"".join(self.chunks))
        else:
            result = {"outcome": "crash", "type": "killed", "message": f"child ended with status {status} and no report"}
        seconds = round(time.monotonic() - self.start, 2)
        return {**result, "path": self.path, "seconds": seconds, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    extra_memory, timeout, parallel = int(sys.argv[1]) << 20, float(sys.argv[2]), int(sys.argv[3])
    paths = json.load(sys.stdin)
    import torch

    torch.set_num_threads(1)
    from lmgen.layers import quant

    quant.supported_packed_qtypes()  # compile / load the kernels once, before the forks
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"worker_rss_mib": round(base, 1)}), flush=True)
    pending, running = list(reversed(paths)), []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(_Child(pending.pop(), extra_memory))
        for child in list(running):
            result = child.poll(timeout)
            if result is not None:
                running.remove(child)
                print(json.dumps(result), flush=True)
        time.sleep(0.01)


if __name__ == "__main__":
    main()
