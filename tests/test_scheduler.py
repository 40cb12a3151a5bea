"""Scheduler and BlockManager with faked sampled tokens and no model (vLLM tests/v1/core style)."""

from __future__ import annotations

import pytest

from lmgen.engine.kv_cache import BlockManager
from lmgen.engine.request import Request, RequestStatus
from lmgen.engine.scheduler import SampledTokens, Scheduler, SchedulerOutput
from lmgen.sampling.params import SamplingParams


def make_req(rid: str, prompt_len: int, max_tokens: int = 8, start: int = 0, **params) -> Request:
    return Request(rid, list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens, **params))


def fake_model(out: SchedulerOutput, token: int = 7) -> SampledTokens:
    """A model that draws `token` for every sequence that reached its newest token."""
    return SampledTokens({r.request_id: token for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens})


def fake_step(sched: Scheduler, token: int = 7) -> list[tuple[str, int]]:
    """schedule -> (fake) execute -> update_from_output, as Engine.step does."""
    out = sched.schedule()
    sched.update_from_output(out, fake_model(out, token))
    return [(r.request_id, n) for r, n in out.scheduled]


def test_prefill_then_decode_on_token_counters():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(make_req("a", 10, max_tokens=3))
    assert fake_step(sched) == [("a", 10)]  # prefill: the whole prompt
    assert fake_step(sched) == [("a", 1)]  # decode: one token
    assert fake_step(sched) == [("a", 1)]
    assert sched.num_unfinished == 0
    assert bm.num_used_blocks == 0  # blocks returned on finish


def test_chunked_prefill_shares_steps_with_running_decodes():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    sched.add(make_req("short", 3, max_tokens=10))
    assert fake_step(sched) == [("short", 3)]
    sched.add(make_req("long", 20, max_tokens=2, start=100))
    # the long prompt is cut into chunks that fit the budget left after the running decode
    assert fake_step(sched) == [("short", 1), ("long", 7)]
    assert fake_step(sched) == [("short", 1), ("long", 7)]
    assert fake_step(sched) == [("short", 1), ("long", 6)]  # last chunk: long samples its first token
    assert fake_step(sched) == [("short", 1), ("long", 1)]


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(make_req(f"r{i}", 4, start=10 * i))
    assert [rid for rid, _ in fake_step(sched)] == ["r0", "r1"]
    assert len(sched.waiting) == 1


def test_prefix_cache_hits_skip_shared_blocks_and_leave_one_token():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a = make_req("a", 10, max_tokens=1)
    sched.add(a)
    fake_step(sched)  # a finishes after its prefill (max_tokens=1); its 2 full blocks stay cached
    assert a.is_finished and bm.num_used_blocks == 0
    b = Request("b", list(range(10)) + [99, 98], SamplingParams(max_tokens=1))
    sched.add(b)
    assert fake_step(sched) == [("b", 4)]  # 8 of 12 tokens came from the cache
    assert b.num_cached_tokens == 8
    c = Request("c", list(range(8)), SamplingParams(max_tokens=1))  # exactly 2 full blocks
    sched.add(c)
    assert fake_step(sched) == [("c", 4)]  # only block 0 reused: the last token must be computed for logits
    assert bm.prefix_hits == 3


def test_preemption_by_recompute_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=4)  # 16 slots in all
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = make_req("a", 7, max_tokens=6), make_req("b", 7, max_tokens=6, start=50)
    sched.add(a)
    sched.add(b)
    assert fake_step(sched) == [("a", 7), ("b", 7)]  # 2 blocks each, all 4 used
    assert fake_step(sched) == [("a", 1), ("b", 1)]  # positions 7: still inside block 2
    out = sched.schedule()  # a needs a 3rd block: b (the newest) is preempted, never a crash
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1)]
    assert b.num_computed_tokens == 0 and b.block_table == [] and len(b.output_token_ids) == 2
    sched.update_from_output(out, fake_model(out))
    while not a.is_finished:
        fake_step(sched)
    # b comes back and recomputes prompt + its 2 generated tokens in one go; its first block survived
    # in the prefix cache (freed blocks keep their hash; a's allocation evicted b's last one first)
    assert fake_step(sched) == [("b", 5)]
    assert b.num_cached_tokens == 4
    while sched.num_unfinished:
        fake_step(sched)
    assert len(b.output_token_ids) == 6 and bm.num_used_blocks == 0


def test_update_from_output_finishes_on_eos_stop_ids_and_length():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=100, eos_token_ids=frozenset({2}))
    eos, stop_id, length, ignore = (make_req("eos", 3), make_req("stop", 3, start=10, stop_token_ids=[9]),
                                    make_req("len", 3, start=20, max_tokens=1), make_req("ign", 3, start=30, ignore_eos=True))
    for r in (eos, stop_id, length, ignore):
        sched.add(r)
    out = sched.schedule()
    news = sched.update_from_output(out, SampledTokens({"eos": 2, "stop": 9, "len": 5, "ign": 2}))
    got = {o.request_id: (o.new_token_ids, o.finish_reason, o.stop_reason, o.num_output_tokens) for o in news}
    assert got == {"eos": ((2,), "stop", None, 1), "stop": ((9,), "stop", 9, 1), "len": ((5,), "length", None, 1),
                   "ign": ((2,), None, None, 1)}
    assert [r.request_id for r in sched.running] == ["ign"] and sched.block_manager.num_used_blocks == 1


def test_update_from_output_reports_nothing_for_a_prompt_chunk():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=4)
    req = make_req("long", 10)
    sched.add(req)
    out = sched.schedule()
    assert sched.update_from_output(out, fake_model(out)) == [] and req.num_computed_tokens == 4
    assert req.num_hashed_blocks == 1  # its first block filled: hashed once, now findable
    assert req.block_hashes[0] in sched.block_manager.hash_to_block


def test_siblings_wait_for_the_leader_then_share_its_prompt_blocks():
    """n > 1 at admission: the other sequences queue behind the first and reuse its prompt through the prefix cache."""
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    params = SamplingParams(max_tokens=3, n=3)
    lead = Request("r", list(range(10)), params, index=0)
    sibs = [Request(f"r#{i}", list(range(10)), params, index=i, parent_id="r", leader=lead) for i in (1, 2)]
    for r in (lead, *sibs):
        sched.add(r)
    assert fake_step(sched) == [("r", 10)]  # the siblings wait while the leader computes the prompt
    assert fake_step(sched) == [("r", 1), ("r#1", 2), ("r#2", 2)]  # 8 of 10 prompt tokens from the leader's blocks
    assert sibs[0].num_cached_tokens == 8 and bm.ref_counts[lead.block_table[0]] == 3
    while sched.num_unfinished:
        fake_step(sched)
    assert bm.num_used_blocks == 0


def test_a_hash_collision_never_serves_another_prompts_blocks(monkeypatch):
    """Every block key collides: the stored token ids are checked on a hit, so nothing is reused."""
    monkeypatch.setattr(BlockManager, "hash_block", staticmethod(lambda parent, tokens: b"same"))
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    sched.add(make_req("a", 10, max_tokens=1))
    fake_step(sched)
    other = make_req("b", 10, max_tokens=1, start=500)
    sched.add(other)
    assert fake_step(sched) == [("b", 10)] and other.num_cached_tokens == 0
    same = make_req("c", 10, max_tokens=1)  # a's own prompt: its first block still verifies
    assert bm.allocate_prefix(same) == 4


def test_abort_frees_blocks_and_waiting_requests():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    a, b = make_req("a", 5), make_req("b", 5, start=40)
    sched.add(a)
    sched.add(b)
    fake_step(sched)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert sched.num_unfinished == 0 and bm.num_used_blocks == 0
    assert a.finish_reason == "abort"


def test_request_status_order_and_finish_reasons():
    assert not RequestStatus.PREEMPTED.is_finished
    assert all(s.is_finished for s in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED))
    r = make_req("x", 2)
    r.status = RequestStatus.FINISHED_LENGTH
    assert r.finish_reason == "length"


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(BlockManager(4, 4), max_num_seqs=0)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        Scheduler(BlockManager(2, 4)).add(make_req("big", 9))


def test_prompt_logprobs_requests_bypass_the_prefix_cache():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    sched.add(make_req("warm", 10, max_tokens=1))
    fake_step(sched)
    cold = Request("cold", list(range(10)), SamplingParams(max_tokens=1, prompt_logprobs=1))
    sched.add(cold)
    assert fake_step(sched) == [("cold", 10)]  # all positions computed, so each has its logits
    assert cold.num_cached_tokens == 0


def test_blocks_are_reused_warm_first_then_fresh_then_cached_oldest_first():
    """Resident memory follows the blocks in use: a new request gets the blocks just freed that hold no cached
    prefix (their pages are mapped in already) before never-used ones, and a cached prefix is evicted only when
    nothing else is free, least recently freed first."""
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100)
    a = make_req("a", 10, max_tokens=1)  # 11 tokens: blocks 1, 2 full (cached), block 3 partial (not cached)
    sched.add(a)
    fake_step(sched)
    assert a.is_finished and bm.free_cached.keys() == {1, 2} and list(bm.free_plain) == [3]
    b = make_req("b", 3, max_tokens=1, start=500)
    sched.add(b)
    fake_step(sched)
    assert b.is_finished  # b ran in block 3, warm, and left a's cached prefix alone
    assert list(bm.free_plain) == [3] and bm.fresh == [8, 7, 6, 5, 4]
    c = make_req("c", 25, max_tokens=1, start=1000)  # 26 tokens: 7 blocks = block 3, the 5 fresh ones, one cached
    sched.add(c)
    fake_step(sched)
    assert c.is_finished and not bm.fresh
    # a freed its blocks last to first (vLLM's order), so its tail block 2 was evicted and its head block 1 kept
    assert bm.block_hash[1] is not None and bm.block_hash[2] is None  # 2 took c's partial last block
    assert list(bm.free_plain) == [2]
    hit = make_req("hit", 10, max_tokens=1)  # a's prompt again: its first block is still cached
    assert bm.allocate_prefix(hit) == 4 and hit.block_table == [1]


def test_sliding_window_releases_blocks_no_query_can_see():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_req("w", 10, max_tokens=20)
    assert bm.allocate_slots(req, 10)
    req.num_computed_tokens = 10
    bm.cache_full_blocks(req)
    bm.release_out_of_window(req, window=6)  # next position 10 sees 5..10: block 0 (positions 0-3) is dead
    assert req.block_table[0] == 0 and req.block_table[1:] == [2, 3] and bm.num_used_blocks == 2
    req.num_computed_tokens = 13
    bm.release_out_of_window(req, window=6)  # next position 13 sees 8..13: block 1 (4-7) is dead too
    assert req.block_table[:2] == [0, 0] and bm.num_used_blocks == 1
    bm.cache_full_blocks(req)  # the released entries are skipped, the null block never gets a hash
    assert bm.block_hash[0] is None
    bm.free_request(req)
    assert bm.num_used_blocks == 0 and req.num_released_blocks == 0
    # a released block that held a full prompt block stays findable in the prefix cache
    assert bm.block_hash[1] is not None and bm.allocate_prefix(make_req("again", 10)) == 8
