"""A worker rank: joins the torch.distributed group, builds its slice (tensor parallel) or stage (pipeline parallel)
of the model and a KV cache for its heads / layers, then runs the model steps the driver broadcasts until told to
stop (or the driver goes away)."""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client

import torch

logger = logging.getLogger("lmgen.parallel")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build the same model slice and cache layout as the driver (picklable)."""

    model_path: str
    tp_size: int
    pp_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str = "auto"
    batch_invariant: bool = True
    num_blocks: int = 1024
    block_size: int = 16
    threads: int = 1
    dist_url: str = "env://"  # torch.distributed init method: env:// under torchrun, tcp://host:port when spawned
    timeout_s: float = 30.0  # the longest a collective waits for a rank before the step fails
    kv_cache_dtype: str = "float32"  # the driver's, resolved (lmgen.engine.kv_cache.resolve_kv_cache_dtype)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


def init_group(rank: int, world_size: int, dist_url: str, device: str, timeout_s: float) -> None:
    """Joins the gloo (CPU) or NCCL (CUDA) group of `world_size` ranks."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def rank_layout(spec: WorkerSpec, rank: int, num_layers: int):
    """This rank's (TensorParallel, PipelineStage), either None when unused.  Global rank = stage * tp + tp rank;
    with both kinds, each stage's ranks form their own tensor-parallel group.  Every rank must call this (in the
    same order): creating a torch.distributed group is collective."""
    import torch.distributed as dist

    from lmgen.layers.parallel import TensorParallel
    from lmgen.layers.pipeline import PipelineStage

    tp_size, pp_size = spec.tp_size, spec.pp_size
    stage, tp_rank = divmod(rank, tp_size)
    group = None
    if tp_size > 1 and pp_size > 1:
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        group = groups[stage]
    tp = TensorParallel(tp_rank, tp_size, group) if tp_size > 1 else None
    pp = PipelineStage.of(stage, pp_size, num_layers, tp_rank, tp_size) if pp_size > 1 else None
    return tp, pp


def build_rank_model(spec: WorkerSpec, rank: int, layout, loaded):
    """This rank's slice (lmgen.layers.parallel) and / or stage (lmgen.layers.pipeline) of the model."""
    from lmgen.models.registry import build_model

    tp, pp = layout
    device = f"cuda:{rank}" if spec.device.startswith("cuda") else spec.device  # one GPU per rank
    return build_model(loaded.config, loaded.weights.items(), getattr(torch, spec.dtype), device, spec.quantization,
                       batch_invariant=spec.batch_invariant, tp=tp, pp=pp)


def serve_worker(rank: int, world_size: int, dist_url: str, device: str, timeout_s: float) -> None:
    """The worker's whole life: join the group, receive the driver's spec and control address, connect, build
    this rank's slice, run steps.  Under torchrun (dist_url "env://") this is all a rank > 0 needs to know."""
    import torch.distributed as dist

    from lmgen.engine.kv_cache import KVCache

    init_group(rank, world_size, dist_url, device, timeout_s)
    control = [None]
    dist.broadcast_object_list(control, src=0)  # what to build, and the driver's control address and key
    spec, address, authkey = control[0]
    torch.set_num_threads(spec.threads)
    from lmgen.loader import load_model

    loaded = load_model(spec.model_path)
    layout = rank_layout(spec, rank, loaded.config.num_layers)
    conn = Client(address, authkey=authkey)
    conn.send(("hello", rank))
    model = build_rank_model(spec, rank, layout, loaded)
    cfg = model.config
    cache = KVCache(cfg.num_layers, spec.num_blocks, spec.block_size, cfg.num_kv_heads, cfg.head_dim,
                    getattr(torch, spec.kv_cache_dtype), model.device)
    conn.send(("ready", rank))
    with torch.inference_mode():
        while True:
            try:
                command = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the driver is gone: nothing left to serve
                break
            op = command[0]
            if op == "forward":
                _, input_ids, positions, meta = command
                model(input_ids, positions, cache.layers, meta)
            elif op == "forward_micro_batches":
                model.forward_micro_batches(command[1], cache.layers)
            elif op == "logits" and getattr(model, "lm_head", None) is not None:  # the output layer's ranks
                model.compute_logits(command[1])
            elif op == "copy_block":
                cache.copy_block(command[1], command[2])
            elif op == "stop":
                break
    conn.close()
    dist.destroy_process_group()


def serve_torchrun_worker(device: str) -> bool:
    """Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR set), a rank > 0 serves as a worker until the driver stops,
    then returns True; rank 0 (or no torchrun) returns False at once, to go on as the driver."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or "MASTER_ADDR" not in os.environ:
        return False
    serve_worker(rank, int(os.environ["WORLD_SIZE"]), "env://", device, WorkerSpec.timeout_s)
    return True


def worker_main(rank: int, world_size: int, dist_url: str, device: str, timeout_s: float) -> None:
    """Entry point of a worker process: any failure ends the process with status 1 (the driver's collectives
    then fail at once, instead of waiting on a rank that will never answer)."""
    try:
        serve_worker(rank, world_size, dist_url, device, timeout_s)
    except BaseException:
        logger.exception("tensor-parallel worker %d failed", rank)
        os._exit(1)
