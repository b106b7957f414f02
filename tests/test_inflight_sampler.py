"""The in-flight engine's per-request sampler: each row's processing is its own, and OpenAI's
frequency penalty subtracts once per occurrence in the output (vLLM's definition)."""

import torch

from ft_runner.engine.request import Request, SamplingOptions
from ft_runner.engine.sampler import sample_requests


def request(options, prompt=(3, 4, 4), output=()):
    r = Request(0, list(prompt), options, (0,))
    for token in output:
        r.append(token, 0.0)
    return r


def test_frequency_penalty_counts_output_occurrences_only():
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0))
    r = request(SamplingOptions(max_tokens=20, frequency_penalty=0.7, temperature=0.5), output=(5, 5, 4, 7))
    want = logits[0].clone()
    for token, count in ((5, 2), (4, 1), (7, 1)):  # the prompt's 4s do not count; before the temperature
        want[token] -= 0.7 * count
    want /= 0.5
    token, logprob = sample_requests(logits.clone(), [r])
    assert token[0] == int(torch.argmax(want))
    assert abs(logprob[0] - float(torch.log_softmax(want, -1)[token[0]])) < 1e-5


def test_rows_do_not_affect_each_other():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen)
    rows = [request(SamplingOptions(max_tokens=9, top_k=5, seed=11), output=(1,)),
            request(SamplingOptions(max_tokens=9, repetition_penalty=1.5, min_length=3)),
            request(SamplingOptions(max_tokens=9, top_p=0.8, seed=3, bad_words=((4, 9),)), prompt=(2, 4))]
    together = sample_requests(logits.clone(), rows)
    for i, row in enumerate(rows):
        alone = sample_requests(logits[i:i + 1].clone(), [row])
        assert together[0][i] == alone[0][0] and abs(together[1][i] - alone[1][0]) < 1e-6
    assert together[0][1] != 0, "min_length forbids the end token"
    banned = sample_requests(torch.full((1, 50), -5.0).index_fill_(1, torch.tensor([9]), 5.0), [rows[2]])
    assert banned[0][0] != 9, "the bad word (4, 9) may not complete after a 4"
