"""Pipeline parallelism: each rank holds a contiguous stage of the decoder layers; activations go from stage to
stage with torch.distributed send / recv.  Rank 0 (the driver) also holds the embedding and the output layer: it
embeds the step's tokens, runs its layers, and receives the final (normed) hidden states back from the last stage.
A step split into micro-batches (by sequence) overlaps the stages: a stage sends micro-batch i on without waiting
and starts on i + 1 while the next stage works on i (GPipe's schedule, Huang et al., 2019, for inference).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PipelineStage:
    """This process's stage: stage `rank` of `size` holds decoder layers [first, end).  With tensor parallelism
    too, each stage has `tp_size` ranks and this process is the `tp_rank`-th: it talks to the same tp rank of the
    neighbouring stages (global rank = stage * tp_size + tp_rank)."""

    rank: int
    size: int
    first: int
    end: int
    tp_rank: int = 0
    tp_size: int = 1

    @classmethod
    def of(cls, rank: int, size: int, num_layers: int, tp_rank: int = 0, tp_size: int = 1) -> "PipelineStage":
        """Stage `rank` of `size` over `num_layers` layers, split as evenly as possible."""
        bounds = [num_layers * r // size for r in range(size + 1)]
        return cls(rank, size, bounds[rank], bounds[rank + 1], tp_rank, tp_size)

    def peer(self, stage: int) -> int:
        """The global rank of this process's counterpart in `stage`."""
        return stage * self.tp_size + self.tp_rank

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def local_config(self, config):
        """The config as this stage sees it: its number of layers (its KV cache holds only those)."""
        return dataclasses.replace(config, num_layers=self.end - self.first)

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device, src: int) -> torch.Tensor:
        import torch.distributed as dist

        out = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(out, src=src)
        return out



def run_pipelined(stage: PipelineStage, run, batches: list, kv_caches, hidden_size: int, dtype, device):
    """Runs this stage's part of every micro-batch (input_ids, positions, meta) in order.  `run(ids, positions,
    kv_caches, meta, x)` is the stage's layers (x None on the first stage: it embeds).  -> on the first stage the
    last stage's outputs, concatenated in order (tokens, hidden); elsewhere None."""
    import torch.distributed as dist

    sends = []  # (work, tensor): a tensor must live until its send completes
    for input_ids, positions, meta in batches:
        shape = (input_ids.shape[0], hidden_size)
        x = None if stage.is_first else stage.receive(shape, dtype, device, src=stage.peer(stage.rank - 1))
        out = run(input_ids, positions, kv_caches, meta, x).contiguous()
        dst = stage.peer(0 if stage.is_last else stage.rank + 1)
        sends.append((dist.isend(out, dst=dst), out))
    outs = [stage.receive((b[0].shape[0], hidden_size), dtype, device, src=stage.peer(stage.size - 1))
            for b in batches] if stage.is_first else None
    for work, _ in sends:
        work.wait()
    return None if outs is None else torch.cat(outs) if len(outs) > 1 else outs[0]
