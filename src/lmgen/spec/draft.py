"""A draft model (or the target's own weights packed) proposing k tokens per step, batched over requests.

The draft keeps its own paged KV cache (its own BlockManager, no prefix cache) and one shadow sequence per
target sequence. Before proposing, a shadow is synced to the target's accepted tokens: positions past the
longest common prefix are rolled back (their slots are overwritten by the next tokens), then it catches up
in one chunk and drafts k tokens, one forward pass each."""

from __future__ import annotations

import torch

from lmgen.engine.kv_cache import BlockManager, KVCache
from lmgen.engine.request import Request
from lmgen.engine.runner import ModelRunner
from lmgen.engine.scheduler import SchedulerOutput
from lmgen.models.base import CausalLM
from lmgen.sampling.params import SamplingParams
from lmgen.spec.verify import draw, final_distributions, one_thread, uniform

Proposal = tuple[list[int], torch.Tensor | None]  # drafts, q (k, vocab) for sampled requests (None: greedy)


class DraftProposer:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int):
        cfg = model.config
        self.model = model
        self.kv_cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.kv_cache)
        self.shadows: dict[str, Request] = {}  # target sequence id -> the draft's copy of it
        self._params = SamplingParams(max_tokens=1)  # the shadow's own: the runner only reads prompt_logprobs

    def release(self, seq_id: str) -> None:
        """The target sequence ended: free its shadow's blocks."""
        shadow = self.shadows.pop(seq_id, None)
        if shadow is not None:
            self.block_manager.free_request(shadow)

    def _sync(self, req: Request) -> Request:
        shadow = self.shadows.get(req.request_id)
        if shadow is None or shadow.prompt_token_ids != req.prompt_token_ids:
            self.release(req.request_id)
            shadow = self.shadows[req.request_id] = Request(req.request_id, req.prompt_token_ids, self._params)
        mine, theirs = shadow.output_token_ids, req.output_token_ids
        common = 0
        limit = min(len(mine), len(theirs))
        while common < limit and mine[common] == theirs[common]:
            common += 1
        shadow.output_token_ids = list(theirs)
        # at least the newest token is recomputed: its logits give the first draft
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, req.num_prompt_tokens + common, shadow.num_tokens - 1)
        return shadow

    def propose(self, reqs: list[Request], ks: list[int], stop_ids: list[set[int]]) -> list[Proposal]:
        """Up to ks[i] drafts for each of `reqs` (fewer where the draft cache is full), with their q."""
        shadows = [self._sync(r) for r in reqs]
        drafts: list[list[int]] = [[] for _ in reqs]
        qs: list[list[torch.Tensor]] = [[] for _ in reqs]
        live = list(range(len(reqs)))
        while live:
            batch = []
            for i in live:
                n = shadows[i].num_tokens - shadows[i].num_computed_tokens
                if self.block_manager.allocate_slots(shadows[i], n):
                    batch.append((i, n))
            if not batch:
                break
            out = self.runner.run(SchedulerOutput([(shadows[i], n) for i, n in batch]))
            rows = [i for i, _ in batch]
            for i, n in batch:
                shadows[i].num_computed_tokens += n
            with one_thread():  # small ops: see one_thread
                argmax, probs = final_distributions(out.logits, [reqs[i] for i in rows],
                                                    [shadows[i].output_token_ids for i in rows], [stop_ids[i] for i in rows])
                am = argmax.tolist()
                for row, i in enumerate(rows):
                    if reqs[i].params.greedy:
                        token = am[row]
                    else:
                        token = draw(probs[row], uniform(reqs[i].generator))
                        qs[i].append(probs[row])
                    drafts[i].append(token)
                    shadows[i].output_token_ids.append(token)
            live = [i for i in rows if len(drafts[i]) < ks[i]]
        return [(d, torch.stack(q) if q else None) for d, q in zip(drafts, qs)]
