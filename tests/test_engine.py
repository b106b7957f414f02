"""Rank 0's front end over the in-flight engine: requests join and leave the running batch at
every step, and each gets exactly what it would have got alone (tokens, lengths, log-probs,
streamed tokens), whatever runs beside it, even with a cache small enough to force preemption."""

import threading
import time

import numpy as np
import pytest
import torch
import transformers
from helpers import hf_greedy, make_tiny_gpt2

from ft_runner import parallel
from ft_runner.checkpoint.convert import convert
from ft_runner.checkpoint.load import load_stage
from ft_runner.config import EngineConfig, ServingConfig
from ft_runner.engine.core import EngineCore
from ft_runner.engine.generator import Batch, Generator
from ft_runner.engine.sampler import Finish
from ft_runner.serving.frontend import Frontend, QueueFull, RequestTimeout
from ft_runner.serving.protocol import Channel

SMALL = EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, kv_block_size=8, kv_cache_blocks=14)


@pytest.fixture(scope="module")
def generator(tiny_gpt2, tmp_path_factory):
    runtime = parallel.init_runtime(1, 1, "cpu")
    ckpt = convert(tiny_gpt2, tmp_path_factory.mktemp("ft"), 1)
    return Generator(load_stage(ckpt, runtime.grid, None, "fp32", runtime.device), runtime), runtime


def frontend(gen, runtime, config=SMALL) -> Frontend:
    return Frontend(EngineCore(gen.model, runtime, config), gen, Channel(runtime.comm))


@pytest.fixture
def serving(generator):
    """A front end whose engine thread runs until the test ends."""
    gen, runtime = generator
    front = frontend(gen, runtime)
    stop = threading.Event()
    thread = threading.Thread(target=front.run, args=(stop,), daemon=True)
    thread.start()
    yield front
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_jobs_in_flight_get_exactly_what_they_get_alone(generator, serving, tiny_gpt2):
    gen, _ = generator
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    end = tok.eos_token_id
    batches = [
        Batch.make([tok("Thank you for")["input_ids"]], 9, end_id=end),
        Batch.make([tok("x")["input_ids"], tok("The class statement defines")["input_ids"]], [3, 12], end_id=end,
                   top_k=5, temperature=0.8, seed=[1, 2]),
        Batch.make([tok("Q: Are you going for lunch?")["input_ids"]], 5, end_id=end, stop_words=[[[11, 12]]]),
        Batch.make([tok("A long prompt that needs several chunks of the token budget: " * 2)["input_ids"]], 30,
                   end_id=end, repetition_penalty=1.3, min_length=4, bad_words=[[[11], [50, 51]]]),
        Batch.make([[5, 6, 7], [8]], [25, 20], end_id=end, top_p=0.9, seed=[7, 8], presence_penalty=0.5),
    ]
    alone = [gen.generate(b) for b in batches]
    streams = [[] for _ in batches]
    futures = []
    for i, batch in enumerate(batches):  # arriving while the earlier ones run
        futures.append(serving.submit_async(batch, on_token=lambda step, t, r, i=i: streams[i].append(t.copy())))
        time.sleep(0.02)
    for batch, solo, future, stream in zip(batches, alone, futures, streams):
        got = future.result(60)
        np.testing.assert_array_equal(got.output_ids, solo.output_ids)
        np.testing.assert_array_equal(got.sequence_lengths, solo.sequence_lengths)
        np.testing.assert_array_equal(got.finish_reason, solo.finish_reason)
        np.testing.assert_allclose(got.output_log_probs, solo.output_log_probs, atol=1e-4)
        streamed = np.stack(stream, axis=1)
        for row in range(batch.size):
            new = solo.sequence_lengths[row] - batch.lengths[row]
            np.testing.assert_array_equal(streamed[row, :new], solo.output_ids[row, batch.lengths[row]:][:new])
    assert serving.core.scheduler.preemptions > 0, "the small cache was meant to force preemption"
    counted = {m.name: s.value for m in serving.metrics.registry.collect() for s in m.samples if s.name.endswith("_total")}
    assert counted["ft_runner:num_preemptions"] == serving.core.scheduler.preemptions
    assert serving.core.blocks.usage == 0.0, "every page went back"


def test_a_short_request_sent_during_a_long_one_returns_first(serving):
    long = serving.submit_async(Batch.make([[5, 6, 7]], 100, end_id=-1))
    time.sleep(0.05)
    short = serving.submit_async(Batch.make([[9, 10]], 3, end_id=-1))
    short.result(30)
    assert not long.done(), "the short request did not wait for the long one to finish"
    assert long.result(60).sequence_lengths.tolist() == [103]


def test_run_drains_the_queue_then_stops(generator):
    gen, runtime = generator
    front = frontend(gen, runtime)
    stop = threading.Event()
    future = front.submit_async(Batch.make([[5, 6, 7]], 4, end_id=-1))
    stop.set()
    front.run(stop)
    assert future.result(0).sequence_lengths.tolist() == [7]
    with pytest.raises(RuntimeError, match="shutting down"):
        front.submit_async(Batch.make([[5]], 1, end_id=-1))


def test_a_cancelled_job_frees_its_pages_at_the_next_step_and_the_others_finish(generator):
    """A client that leaves frees its rows at the next step; a queued job given up by key never
    runs; the request beside them is unaffected; metrics count each outcome."""
    gen, runtime = generator
    front = frontend(gen, runtime, EngineConfig(kv_block_size=8, kv_cache_blocks=32))
    staying_batch = Batch.make([[8, 9]], 20, end_id=-1)
    alone = gen.generate(staying_batch)
    seen = []

    def on_token(step, tokens, reasons):
        seen.append(step)
        if step == 2:
            leaving.cancel()

    leaving = front.submit_async(Batch.make([[5, 6, 7]], 100, end_id=-1), on_token=on_token)
    staying = front.submit_async(staying_batch)
    front.submit_async(Batch.make([[4]], 5, end_id=-1), key="queued")
    assert front.cancel("queued") and not front.cancel("unknown")
    stop = threading.Event()
    stop.set()
    front.run(stop)
    assert leaving.cancelled() and seen == [0, 1, 2], "no step after the one that cancelled it"
    np.testing.assert_array_equal(staying.result(0).output_ids, alone.output_ids)
    assert outcomes(front) == {"cancelled": 2.0, "success": 1.0}
    assert front.core.blocks.usage == 0.0


def outcomes(front: Frontend) -> dict:
    return {s.labels["outcome"]: s.value for m in front.metrics.requests.collect() for s in m.samples
            if s.name.endswith("_total")}


def test_a_job_past_its_deadline_stops_at_the_next_step_and_frees_its_pages(generator):
    """Its rows end like a cancelled job's, its future raises RequestTimeout; a queued job already past its
    deadline never runs; the job beside them is unchanged."""
    gen, runtime = generator
    front = frontend(gen, runtime, EngineConfig(kv_block_size=8, kv_cache_blocks=32))
    staying_batch = Batch.make([[8, 9]], 20, end_id=-1)
    alone = gen.generate(staying_batch)
    seen = []

    def on_token(step, tokens, reasons):  # on the engine thread: its deadline passes during step 2's delivery
        seen.append(step)
        if step == 2:
            time.sleep(0.6)

    late = front.submit_async(Batch.make([[5, 6, 7]], 100, end_id=-1), on_token=on_token, timeout_s=0.5)
    staying = front.submit_async(staying_batch)
    expired = front.submit_async(Batch.make([[4]], 5, end_id=-1), timeout_s=1e-6)
    stop = threading.Event()
    stop.set()
    front.run(stop)
    for future, limit in ((late, "0.5"), (expired, "1e-06")):
        with pytest.raises(RequestTimeout, match=rf"did not finish within its deadline of {limit} s"):
            future.result(0)
    assert seen == [0, 1, 2], "no step after its deadline"
    np.testing.assert_array_equal(staying.result(0).output_ids, alone.output_ids)
    assert outcomes(front) == {"timeout": 2.0, "success": 1.0}
    assert front.core.blocks.usage == 0.0


def test_a_full_queue_refuses_at_once_and_a_health_probe_is_never_refused(generator):
    """--max-queue-len counts the rows already waiting, not the new request's: 3 wait, the next is refused."""
    gen, runtime = generator
    front = Frontend(EngineCore(gen.model, runtime, SMALL), gen, Channel(runtime.comm),
                     limits=ServingConfig(max_queue_len=2))
    accepted = [front.submit_async(Batch.make([[5, 6]], 4, end_id=-1)),
                front.submit_async(Batch.make([[7], [8]], 4, end_id=-1))]  # 1 row waits before it
    with pytest.raises(QueueFull, match=r"3 requests already wait for the engine \(--max-queue-len 2\)"):
        front.submit_async(Batch.make([[9]], 4, end_id=-1))
    accepted.append(front.submit_async(Batch.make([[9]], 1, end_id=-1), probe=True))
    stop = threading.Event()
    stop.set()
    front.run(stop)
    assert [f.result(0).sequence_lengths.tolist() for f in accepted] == [[6], [5, 5], [2]]
    assert outcomes(front) == {"rejected": 1.0, "success": 4.0}


def test_a_request_too_long_for_the_cache_fails_alone(generator):
    gen, runtime = generator
    front = frontend(gen, runtime, EngineConfig(kv_block_size=8, kv_cache_blocks=2))
    too_long = front.submit_async(Batch.make([list(range(1, 20))], 10, end_id=-1))
    fine = front.submit_async(Batch.make([[5]], 3, end_id=-1))
    stop = threading.Event()
    stop.set()
    front.run(stop)
    with pytest.raises(ValueError, match="KV-cache pages"):
        too_long.result(0)
    assert fine.result(0).sequence_lengths.tolist() == [4]


def test_beam_jobs_take_the_static_path_between_steps(generator):
    gen, runtime = generator
    front = frontend(gen, runtime)
    beams = Batch.make([[5, 6, 7]], 6, end_id=-1, beam_width=2)
    plain = Batch.make([[8, 9]], 12, end_id=-1)
    want_beams, want_plain = gen.generate(beams), gen.generate(plain)
    futures = [front.submit_async(plain), front.submit_async(beams)]
    stop = threading.Event()
    stop.set()
    front.run(stop)
    np.testing.assert_array_equal(futures[0].result(0).output_ids, want_plain.output_ids)
    np.testing.assert_array_equal(futures[1].result(0).output_ids, want_beams.output_ids)


def test_each_of_the_models_end_tokens_ends_a_row_as_in_transformers(generator, tmp_path):
    """Llama 3 Instruct lists several end tokens (eos_token_id [128001, 128008, 128009]): any of them ends a
    row, as in HF's generate; a row that sets its own end_id (here -1: never end) is not affected."""
    _, runtime = generator
    prompt, free = [5, 6, 7], None
    for seed in range(20):  # a model whose free continuation has a new token at step 5
        plain = make_tiny_gpt2(tmp_path / f"plain{seed}", seed=seed)
        free = hf_greedy(plain, prompt, 12)[len(prompt):]
        if len(free) == 12 and free[4] not in free[:4] and 0 not in free:
            break
    other = free[4]
    model_dir = make_tiny_gpt2(tmp_path / "ends", seed=seed, eos_token_id=[0, other])
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()
    assert want == prompt + free[:5], "HF stops at the second end token"

    ckpt = convert(model_dir, tmp_path / "ft", 1)
    gen = Generator(load_stage(ckpt, runtime.grid, None, "fp32", runtime.device), runtime)
    batch = Batch.make([prompt, prompt], 12, end_id=[0, -1])
    front = frontend(gen, runtime)
    future = front.submit_async(batch)
    stop = threading.Event()
    stop.set()
    front.run(stop)
    for out in (gen.generate(batch), future.result(0)):  # the static engine, the in-flight one
        assert out.sequence_lengths.tolist() == [len(want), len(prompt) + 12]
        assert out.output_ids[0, :len(want)].tolist() == want and out.output_ids[1, 3:].tolist() == free
        assert out.finish_reason.tolist() == [Finish.END_ID, Finish.LENGTH]
