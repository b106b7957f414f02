"""The scheduler and block manager on fake requests (no model): budgets, chunks, admission order,
preemption by recompute, pages going back."""

import pytest

from ft_runner.config import ConfigError, EngineConfig
from ft_runner.engine.block_manager import BlockManager
from ft_runner.engine.core import make_plan
from ft_runner.engine.request import Request, SamplingOptions, Status
from ft_runner.engine.scheduler import Scheduler


def make(pages=16, block=4, **config):
    blocks = BlockManager(pages, block)
    return Scheduler(EngineConfig(kv_block_size=8, **config), blocks, max_model_len=64), blocks


def request(i, prompt_len, max_tokens=8):
    return Request(i, list(range(1, prompt_len + 1)), SamplingOptions(max_tokens=max_tokens), (0,))


def run(scheduler, schedule, token=7):
    """What the engine does after a step: mark computed, append a token to every row that samples."""
    scheduler.computed(schedule)
    for row in schedule.rows:
        if row.samples:
            row.request.append(token, 0.0)


def test_a_long_prompt_is_chunked_to_the_token_budget_and_decodes_come_first():
    scheduler, _ = make(max_num_batched_tokens=10)
    a, b = request(0, 3), request(1, 25)
    scheduler.add(a)
    scheduler.add(b)
    first = scheduler.schedule()
    assert [(r.request.id, r.start, r.count) for r in first.rows] == [(0, 0, 3), (1, 0, 7)]
    assert [r.samples for r in first.rows] == [True, False]
    run(scheduler, first)
    second = scheduler.schedule()  # a decodes (1 token) and comes first; b takes the rest of the budget
    assert [(r.request.id, r.start, r.count) for r in second.rows] == [(0, 3, 1), (1, 7, 9)]
    plan = make_plan(second)
    assert plan.num_decode == 1 and plan.cu_seqlens.tolist() == [0, 1, 10]
    assert plan.positions.tolist() == [3, *range(7, 16)] and plan.context_lens.tolist() == [3, 7]
    assert plan.sample_rows.tolist() == [0]


def test_max_num_seqs_limits_the_running_batch():
    scheduler, _ = make(max_num_seqs=2)
    for i in range(3):
        scheduler.add(request(i, 2))
    rows = scheduler.schedule().rows
    assert [r.request.id for r in rows] == [0, 1] and len(scheduler.waiting) == 1


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits():
    scheduler, _ = make(max_num_batched_tokens=10, enable_chunked_prefill=False)
    scheduler.add(request(0, 6))
    scheduler.add(request(1, 6))
    assert [r.request.id for r in scheduler.schedule().rows] == [0]


def test_out_of_pages_the_newest_running_request_is_preempted_and_recomputed_first():
    scheduler, blocks = make(pages=4, block=4)
    old, new = request(0, 4, max_tokens=12), request(1, 4, max_tokens=12)
    scheduler.add(old)
    scheduler.add(new)
    run(scheduler, scheduler.schedule())  # 1 page each, both sampled a token
    for _ in range(5):  # positions 4..7 fit 2 pages each; position 8 needs a third page
        schedule = scheduler.schedule()
        run(scheduler, schedule)
    assert schedule.preempted == [new] and [r.request for r in schedule.rows] == [old]
    assert new.status == Status.WAITING and scheduler.preemptions == 1 and new.num_computed == 0
    assert new.block_ids == [] and scheduler.waiting[0] is new
    assert new.output == [7] * 5, "its output so far is kept, to be recomputed with the prompt"
    while old.status != Status.FINISHED:
        schedule = scheduler.schedule()
        run(scheduler, schedule)
        for row in schedule.rows:
            if row.request.finish:
                scheduler.finish(row.request)
    schedule = scheduler.schedule()
    assert [(r.request.id, r.start, r.count) for r in schedule.rows] == [(1, 0, 9)], "prompt + 5 output tokens"
    assert blocks.usage == 0.75


def test_pages_are_reference_counted():
    blocks = BlockManager(4, 4)
    a, b = request(0, 1), request(1, 1)
    assert blocks.allocate(a, 8) and a.block_ids == [0, 1]
    b.block_ids = list(a.block_ids)  # shared (a prefix): held twice
    for page in b.block_ids:
        blocks.refs[page] += 1
    blocks.release(a)
    assert blocks.usage == 0.5 and list(blocks.free) == [2, 3]
    blocks.release(b)
    assert blocks.usage == 0.0
    assert not blocks.allocate(a, 20) and a.block_ids == [], "all or nothing"


def test_a_request_that_can_never_fit_is_refused_up_front():
    scheduler, _ = make(pages=2, block=4)
    with pytest.raises(ConfigError, match="KV-cache pages"):
        scheduler.check(request(0, 6, max_tokens=8))
    with pytest.raises(ConfigError, match="max_model_len"):
        make()[0].check(request(0, 60, max_tokens=8))


def cached(pages=16, block=4, **config):
    blocks = BlockManager(pages, block, prefix_caching=True)
    return Scheduler(EngineConfig(kv_block_size=8, **config), blocks, max_model_len=64), blocks


def finish_all(scheduler):
    while scheduler.has_unfinished():
        schedule = scheduler.schedule()
        run(scheduler, schedule)
        for row in schedule.rows:
            if row.request.finish:
                scheduler.finish(row.request)


def test_a_prompt_starting_like_a_finished_one_shares_its_full_pages_and_computes_the_rest():
    scheduler, blocks = cached()
    first = Request(0, list(range(1, 11)), SamplingOptions(max_tokens=2), (0,))  # 10 tokens: 2 full pages
    scheduler.add(first)
    finish_all(scheduler)
    assert len(blocks.cached) == 2 and blocks.usage == 0.0, "its full computed pages stay cached"
    extended = Request(1, list(range(1, 11)) + [7, 99], SamplingOptions(max_tokens=2), (0,))
    scheduler.add(extended)
    row = scheduler.schedule().rows[0]
    assert (row.start, row.count) == (8, 4) and extended.block_ids[:2] == first_pages(blocks, 2)
    assert scheduler.prefix_hits == 8 and scheduler.prefix_queries == 10 + 12


def first_pages(blocks, n):
    return sorted(blocks.cached.values())[:n]


def test_a_fully_cached_prompt_still_computes_its_last_token_and_shared_pages_outlive_each_holder():
    scheduler, blocks = cached()
    a = Request(0, list(range(1, 9)), SamplingOptions(max_tokens=1), (0,))  # exactly 2 pages
    scheduler.add(a)
    finish_all(scheduler)
    b, c = (Request(i, list(range(1, 9)), SamplingOptions(max_tokens=5), (0,)) for i in (1, 2))
    scheduler.add(b)
    scheduler.add(c)
    rows = scheduler.schedule().rows
    assert [(r.start, r.count) for r in rows] == [(4, 4), (4, 4)], "the last page is recomputed: it holds the last token"
    assert b.block_ids[0] == c.block_ids[0] and blocks.refs[b.block_ids[0]] == 2
    scheduler.finish(b)
    assert blocks.refs[c.block_ids[0]] == 1 and c.block_ids[0] not in blocks.evictable
    scheduler.finish(c)
    assert c.block_ids == [] and blocks.usage == 0.0


def test_cached_pages_are_evicted_least_recently_released_first_only_when_free_ones_run_out():
    scheduler, blocks = cached(pages=4)
    old = Request(0, [1, 2, 3, 4, 5], SamplingOptions(max_tokens=1), (0,))
    scheduler.add(old)
    finish_all(scheduler)
    assert len(blocks.cached) == 1 and len(blocks.free) == 3
    big = Request(1, list(range(10, 25)), SamplingOptions(max_tokens=1), (0,))  # 4 pages: evicts the cached one
    scheduler.add(big)
    scheduler.schedule()
    assert len(blocks.free) == 0 and len(blocks.evictable) == 0
    assert not any(k[1] == (1, 2, 3, 4) for k in blocks.cached)


def test_pipeline_micro_batches_split_the_requests_and_skip_those_in_flight():
    scheduler, _ = make(max_num_batched_tokens=64)
    requests = [request(i, 3) for i in range(4)]
    for r in requests:
        scheduler.add(r)
    first = scheduler.schedule(micro_batches=2)  # about half the requests: the next step gets the rest
    assert [r.request.id for r in first.rows] == [0, 1]
    busy = frozenset(r.request.id for r in first.rows)
    second = scheduler.schedule(busy, micro_batches=2)
    assert [r.request.id for r in second.rows] == [2, 3]
    run(scheduler, first)
    scheduler.computed(second)  # still in flight: no token yet
    third = scheduler.schedule(frozenset({2, 3}), micro_batches=2)
    assert [(r.request.id, r.start, r.count) for r in third.rows] == [(0, 3, 1), (1, 3, 1)]


def test_a_request_in_flight_is_never_the_one_preempted():
    scheduler, blocks = make(pages=3, block=4, max_num_batched_tokens=64)
    old, new = request(0, 4), request(1, 4)
    for r in (old, new):
        scheduler.add(r)
    run(scheduler, scheduler.schedule())  # a page each; both sampled a token
    third = request(2, 4)
    scheduler.add(third)
    run(scheduler, scheduler.schedule(frozenset({0, 1})))  # the last page: only `third` was free to run
    assert blocks.available == 0
    # `third` (newest) is in flight; `old` needs a second page: `new` is preempted, not `third`
    schedule = scheduler.schedule(frozenset({2}))
    assert schedule.preempted == [new] and new.status == Status.WAITING and third.status == Status.RUNNING
