"""The driver's side of tensor parallelism: it starts (or, under torchrun, finds) the workers, and wraps its own
model slice so that every forward pass and logits computation is first broadcast to them.

Control (which step to run, with its token ids, positions and attention metadata) travels over one
multiprocessing connection per worker, as vLLM broadcasts scheduler output over its own message queue; the
tensors of the model itself (all-reduce, all-gather) travel over torch.distributed.  A worker that dies breaks
its connection and the collectives at once: the step fails with WorkerLostError, and the driver refuses further
steps.
"""

from __future__ import annotations

import os
import pickle
import secrets
import socket
import threading
from dataclasses import replace
from multiprocessing.connection import Listener

import torch

from lmgen.engine.kv_cache import KVCache
from lmgen.errors import WorkerLostError
from lmgen.parallel.worker import WorkerSpec, init_group, rank_layout, worker_main


class WorkerGroup:
    """The driver's handle on ranks 1..size-1: their control connections and the processes it spawned."""

    def __init__(self, spec: WorkerSpec, conns: list, procs: list, layout: tuple):
        self.spec, self.conns, self.procs, self.lost = spec, conns, procs, None
        self.layout = layout  # rank 0's (TensorParallel, PipelineStage), see lmgen.parallel.worker.rank_layout

    def broadcast(self, command: tuple) -> None:
        """Sends one step's command to every worker (one pickle for all)."""
        self.check()
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except OSError as e:
                self.fail(f"model worker {rank} is gone ({type(e).__name__})", rank)

    def guarded(self, fn, *args):
        """Runs the driver's part of a step; a collective failing (a rank died or timed out) -> WorkerLostError."""
        try:
            return fn(*args)
        except RuntimeError as e:
            dead = [p.name for p in self.procs if not p.is_alive()]
            why = f"{', '.join(dead)} exited" if dead else str(e).splitlines()[0][:200]
            self.fail(f"a model worker stopped answering: {why}", None)

    def fail(self, message: str, rank: int | None):
        self.lost = WorkerLostError(message, rank=rank)
        raise self.lost

    def check(self) -> None:
        if self.lost is not None:
            raise WorkerLostError(f"the model's process group is broken: {self.lost}", rank=self.lost.rank)

    def close(self, timeout: float = 10.0) -> None:
        """Stops the workers (they exit when their connection closes), then the process group."""
        import torch.distributed as dist

        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
                conn.close()
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(timeout)
        if dist.is_initialized():
            dist.destroy_process_group()


def start_workers(spec: WorkerSpec, num_layers: int) -> WorkerGroup:
    """Spawns ranks 1..size-1 on this machine (or, under torchrun, joins those it started) and connects to them."""
    import torch.multiprocessing as mp

    procs = []
    if spec.dist_url != "env://":
        ctx = mp.get_context("spawn")
        for rank in range(1, spec.world_size):
            p = ctx.Process(target=worker_main, args=(rank, spec.world_size, spec.dist_url, spec.device, spec.timeout_s),
                            name=f"lmgen-tp-worker-{rank}", daemon=True)
            p.start()
            procs.append(p)
    try:
        init_group(0, spec.world_size, spec.dist_url, spec.device, spec.timeout_s)
        conns, layout = _connect(spec, procs, num_layers)
        return WorkerGroup(spec, conns, procs, layout)
    except BaseException:
        for p in procs:
            p.kill()
        raise


def local_spec(spec: WorkerSpec) -> WorkerSpec:
    """The spec with a fresh local rendezvous address (unless torchrun's environment provides one)."""
    if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
        return replace(spec, dist_url="env://")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return replace(spec, dist_url=f"tcp://127.0.0.1:{port}")


def _connect(spec: WorkerSpec, procs: list, num_layers: int) -> tuple[list, tuple]:
    """Accepts every worker's control connection (the address and key go out over torch.distributed) and
    waits until each has built its model slice."""
    import torch.distributed as dist

    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    authkey = secrets.token_bytes(32)
    listener = Listener(("0.0.0.0" if host != "127.0.0.1" else host, 0), authkey=authkey)
    dist.broadcast_object_list([(spec, (host, listener.address[1]), authkey)], src=0)
    layout = rank_layout(spec, 0, num_layers)  # collective: the workers create the same groups
    conns: dict[int, object] = {}

    def accept() -> None:
        for _ in range(spec.world_size - 1):
            conn = listener.accept()
            conns[conn.recv()[1]] = conn

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    t.join(spec.timeout_s)
    listener.close()
    if len(conns) != spec.world_size - 1:
        raise WorkerLostError(f"only {len(conns)} of {spec.world_size - 1} tensor-parallel workers connected within "
                              f"{spec.timeout_s:.0f} s")
    ordered = [conns[r] for r in range(1, spec.world_size)]
    for rank, conn in enumerate(ordered, start=1):
        # building a slice reads the model file: allow for it, but a dead worker is noticed at once
        while not conn.poll(1.0):
            if procs and not procs[rank - 1].is_alive():
                raise WorkerLostError(f"tensor-parallel worker {rank} exited while loading the model", rank=rank)
        conn.recv()
    return ordered, layout


class DriverModel(torch.nn.Module):
    """Rank 0's model slice or first stage, seen by the engine as the whole model: each forward pass (and, under
    tensor parallelism, each logits computation) is broadcast to the workers first."""

    def __init__(self, local: torch.nn.Module, workers: WorkerGroup):
        super().__init__()
        self.local, self.workers = local, workers
        self.config, self.dtype, self.device = local.config, local.dtype, local.device
        self.split_logits = workers.spec.tp_size > 1  # a pipeline's output layer is rank 0's alone
        self.micro_batches = workers.spec.pp_size  # a pipeline step in one micro-batch per stage (ModelRunner)

    def forward(self, input_ids, positions, kv_caches, meta):
        self.workers.broadcast(("forward", input_ids, positions, meta))
        return self.workers.guarded(self.local, input_ids, positions, kv_caches, meta)

    def forward_micro_batches(self, batches: list, kv_caches):
        self.workers.broadcast(("forward_micro_batches", batches))
        return self.workers.guarded(self.local.forward_micro_batches, batches, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.split_logits:
            return self.local.compute_logits(hidden)
        self.workers.broadcast(("logits", hidden))
        return self.workers.guarded(self.local.compute_logits, hidden)

    def weight_bytes(self) -> int:
        """This rank's share of the weights."""
        return self.local.weight_bytes()


class MirroredKVCache(KVCache):
    """The driver's KV cache (its heads); a block copy for a forked beam is made on every rank."""

    def __init__(self, workers: WorkerGroup, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.workers = workers

    def copy_block(self, src: int, dst: int) -> None:
        self.workers.broadcast(("copy_block", src, dst))
        super().copy_block(src, dst)
