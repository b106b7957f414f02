"""Rank 0's engine: requests queued together run as one batch, and each gets exactly what it
would have got alone (tokens, lengths, log-probs, streamed tokens)."""

import threading

import numpy as np
import pytest
import torch
import transformers
from helpers import hf_greedy, make_tiny_gpt2

from ft_runner import parallel
from ft_runner.checkpoint.convert import convert
from ft_runner.checkpoint.load import load_stage
from ft_runner.engine.generator import CANCEL_EVERY, Batch, Generator
from ft_runner.engine.sampler import Finish
from ft_runner.serving.engine import Engine
from ft_runner.serving.protocol import Channel


@pytest.fixture(scope="module")
def generator(tiny_gpt2, tmp_path_factory):
    runtime = parallel.init_runtime(1, 1, "cpu")
    ckpt = convert(tiny_gpt2, tmp_path_factory.mktemp("ft"), 1)
    return Generator(load_stage(ckpt, runtime.grid, None, "fp32", runtime.device), runtime), runtime


def test_queued_jobs_are_merged_and_split_back_exactly(generator, tiny_gpt2):
    gen, runtime = generator
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    end = tok.eos_token_id
    batches = [
        Batch.make([tok("Thank you for")["input_ids"]], 9, end_id=end),
        Batch.make([tok("x")["input_ids"], tok("The class statement defines")["input_ids"]], [3, 12], end_id=end,
                   top_k=5, temperature=0.8, seed=[1, 2]),
        Batch.make([tok("Q: Are you going for lunch?")["input_ids"]], 5, end_id=end, stop_words=[[[11, 12]]]),
    ]
    alone = [gen.generate(b) for b in batches]
    engine = Engine(gen, Channel(runtime.comm))
    streams = [[] for _ in batches]
    futures = [engine.submit_async(b, on_token=lambda step, t, r, i=i: streams[i].append(t.copy()))
               for i, b in enumerate(batches)]
    gathered = engine._gather(engine.jobs.get())
    assert [j.batch for j in gathered] == batches, "all three queued jobs run as one batch"
    engine._execute(gathered)
    for batch, solo, future, stream in zip(batches, alone, futures, streams):
        got = future.result(0)
        np.testing.assert_array_equal(got.output_ids, solo.output_ids)
        np.testing.assert_array_equal(got.sequence_lengths, solo.sequence_lengths)
        np.testing.assert_allclose(got.output_log_probs, solo.output_log_probs, atol=1e-5)
        streamed = np.stack(stream, axis=1)[:, : solo.output_log_probs.shape[1]]
        for row in range(batch.size):
            new = solo.sequence_lengths[row] - batch.lengths[row]
            np.testing.assert_array_equal(streamed[row, :new], solo.output_ids[row, batch.lengths[row]:][:new])


def test_run_drains_the_queue_then_stops(generator):
    gen, runtime = generator
    engine = Engine(gen, Channel(runtime.comm))
    stop = threading.Event()
    future = engine.submit_async(Batch.make([[5, 6, 7]], 4, end_id=-1))
    stop.set()
    engine.run(stop)
    assert future.result(0).sequence_lengths.tolist() == [7]
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit_async(Batch.make([[5]], 1, end_id=-1))


def test_a_cancelled_job_stops_within_a_few_steps_and_its_batch_mates_finish(generator):
    """A client that leaves frees its rows: its job's rows finish as CANCELLED within CANCEL_EVERY steps,
    a queued job given up by key never runs, and the job batched with them is unaffected."""
    gen, runtime = generator
    staying_batch = Batch.make([[8, 9]], 20, end_id=-1)
    alone = gen.generate(staying_batch)
    engine = Engine(gen, Channel(runtime.comm))
    codes = []

    def on_token(step, tokens, reasons):
        codes.append(int(reasons[0]))
        if step == 2:
            leaving.cancel()

    leaving = engine.submit_async(Batch.make([[5, 6, 7]], 200, end_id=-1), on_token=on_token)
    steps = []
    staying = engine.submit_async(staying_batch, on_token=lambda step, tokens, reasons: steps.append(step))
    engine.submit_async(Batch.make([[4]], 5, end_id=-1), key="queued")
    assert engine.cancel("queued") and not engine.cancel("unknown")
    engine._execute(engine._gather(engine.jobs.get()))

    assert leaving.cancelled()
    assert codes[-1] == Finish.CANCELLED and len(codes) <= 3 + CANCEL_EVERY, codes
    assert steps == list(range(20)), "the batch ran as long as the job that stayed, not the one that left"
    np.testing.assert_array_equal(staying.result(0).output_ids, alone.output_ids)
    counts = {s.labels["outcome"]: s.value for m in engine.metrics.requests.collect() for s in m.samples
              if s.name.endswith("_total")}
    assert counts == {"cancelled": 2.0, "success": 1.0}


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
    out = gen.generate(Batch.make([prompt, prompt], 12, end_id=[0, -1]))
    assert out.sequence_lengths.tolist() == [len(want), len(prompt) + 12]
    assert out.output_ids[0, :len(want)].tolist() == want and out.output_ids[1, 3:].tolist() == free
    assert out.finish_reason.tolist() == [Finish.END_ID, Finish.LENGTH]
