"""Per-request sampling parameters, each against an independent reference (issue 4).

Unit tests compare the sampler with HF transformers' logits processors on the same logits, or
with hand-computed values where FT's semantics differ from HF's. End-to-end tests run through the
shared TP=2 server (conftest.surface_server) and compare with HF `generate`.
"""

import re

import numpy as np
import pytest
import torch
from surface import hf_generate, hf_logits, ours, text_infer, token_infer, tokenizer, word_list
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ft_runner.engine.beam import rank_candidates
from ft_runner.engine.generator import Batch
from ft_runner.engine.sampler import (
    DecodeState,
    Finish,
    SamplingParams,
    filter_top_k_top_p,
    parse_word_list,
    sample,
    to_word_list,
    uniform,
)

V = 50


def params(batch: Batch) -> SamplingParams:
    return SamplingParams(**{name: torch.from_numpy(getattr(batch, name)) for name in SamplingParams.__dataclass_fields__})


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


# ----------------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 0.0), (0.7, 0, 0.5), (1.5, 10, 0.8), (0.3, 3, 0.95),
                                                     (2.0, 0, 0.05)])
def test_temperature_top_k_top_p_keep_what_hf_warpers_keep(temperature, top_k, top_p):
    logits = logits_for(4)
    ours_ = filter_top_k_top_p(logits / temperature, torch.full((4,), top_k), torch.full((4,), top_p))
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isfinite(ours_), torch.isfinite(theirs))
    assert torch.allclose(torch.softmax(ours_, -1), torch.softmax(theirs, -1), atol=1e-6)


def test_draws_follow_the_filtered_distribution():
    rows = 4000
    logits = logits_for(1).expand(rows, V)
    batch = Batch.make([[1]] * rows, 1, end_id=0, top_k=4, temperature=0.8, seed=np.arange(rows))
    processed = logits / 0.8
    tokens, lp = sample(processed, params(batch), step=0)
    probs = torch.softmax(filter_top_k_top_p(processed[:1], torch.tensor([4]), torch.tensor([0.0])), -1)[0]
    counts = torch.bincount(tokens, minlength=V).float() / rows
    assert set(tokens.tolist()) <= set(torch.nonzero(probs).view(-1).tolist())
    assert torch.allclose(counts, probs, atol=0.03)
    assert torch.allclose(lp, torch.log_softmax(processed, -1).gather(1, tokens[:, None])[:, 0])


def test_a_rows_random_draws_depend_only_on_its_own_seed():
    seeds = torch.tensor([7, 123456789012, -3, 7])
    together = uniform(seeds, step=5, vocab=V)
    for row, seed in enumerate(seeds):
        assert torch.equal(uniform(seed.view(1), step=5, vocab=V)[0], together[row])
    assert torch.equal(together[0], together[3]) and not torch.equal(together[0], together[1])
    assert not torch.equal(uniform(seeds[:1], 5, V), uniform(seeds[:1], 6, V))


def _state(prompts, end_id=0, **per_row):
    batch = Batch.make(prompts, 8, end_id=end_id, **per_row)
    return batch, DecodeState(batch, V, torch.device("cpu"))


def test_repetition_penalty_equals_hf_processor():
    prompts = [[3, 4, 4, 9], [1, 2, 3, 4]]
    batch, state = _state(prompts, repetition_penalty=1.7)
    logits = logits_for(2, seed=1)
    ours_ = state.process(logits, params(batch), generated=0, end_id=torch.zeros(2, dtype=torch.int64))
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(prompts), logits.clone())
    assert torch.allclose(ours_, theirs)


def test_presence_penalty_is_subtracted_once_after_temperature_as_in_ft():
    batch, state = _state([[3, 3, 5]], presence_penalty=0.5, temperature=2.0)
    state.append(torch.tensor([7]))
    logits = torch.arange(V, dtype=torch.float32)[None, :]
    got = state.process(logits, params(batch), generated=1, end_id=torch.tensor([0]))
    want = logits / 2.0
    want[0, [3, 5, 7]] -= 0.5  # seen tokens, once each however often seen
    assert torch.allclose(got, want)


def test_min_length_equals_hf_processor():
    batch, state = _state([[3, 4]], min_length=3, end_id=11)
    logits = logits_for(1, seed=2)
    for generated in range(5):
        ids = torch.tensor([[3, 4] + [1] * generated])
        theirs = MinNewTokensLengthLogitsProcessor(2, 3, 11)(ids, logits.clone())
        got = state.process(logits, params(batch), generated, torch.tensor([11]))
        assert torch.equal(got, theirs), generated


def test_bad_words_equal_hf_processor_including_multi_token_words():
    bad = [[7], [4, 9], [3, 4, 12], [5, 5]]
    for history in ([3, 4], [1, 4], [2, 5], [5], [3, 4, 9, 3, 4]):
        batch, state = _state([history], bad_words=[bad])
        logits = logits_for(1, seed=3)
        got = state.process(logits, params(batch), 0, torch.tensor([0]))
        theirs = NoBadWordsLogitsProcessor(bad)(torch.tensor([history]), logits.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(theirs)), history


def test_stop_words_end_a_row_when_its_sequence_ends_with_one():
    batch, state = _state([[1, 2], [1, 2]], stop_words=[[[2, 6], [8]], []])
    out_lens, end = torch.tensor([8, 8]), torch.tensor([0, 0])
    assert state.finish(torch.tensor([6, 6]), 0, out_lens, end).tolist() == [Finish.STOP_WORD, Finish.RUNNING]
    assert state.finish(torch.tensor([3, 0]), 1, out_lens, end).tolist() == [Finish.RUNNING, Finish.END_ID]
    assert state.finish(torch.tensor([8, 5]), 7, out_lens, end).tolist() == [Finish.STOP_WORD, Finish.LENGTH]


def test_ft_word_list_format_round_trips():
    words = [[464, 968], [3], [12, 13, 14]]
    array = to_word_list(words)
    assert array.tolist() == [[464, 968, 3, 12, 13, 14], [2, 3, 6, -1, -1, -1]]
    assert parse_word_list(array) == words
    assert parse_word_list(np.array([[0], [-1]])) == []  # FT clients' "no words"


def test_diversity_rate_ranks_candidates_by_their_rank_among_siblings():
    # beam 0 holds the three best scores; with rate -1 a candidate ranks by score - (its rank in its
    # beam), as in FT's beam_topK_kernel: beam 1's best (-1.5 - 0) now beats beam 0's second
    # (-1.1 - 1) and beam 1's second (-1.6 - 1) its third (-1.2 - 2). Scores stay unpenalised.
    total = torch.full((1, 2, 6), -50.0)
    total[0, 0, :3] = torch.tensor([-1.0, -1.1, -1.2])
    total[0, 1, :2] = torch.tensor([-1.5, -1.6])
    score, flat = rank_candidates(total, torch.tensor([0.0]), 4)
    assert flat.tolist() == [[0, 1, 2, 6]] and torch.allclose(score, torch.tensor([[-1.0, -1.1, -1.2, -1.5]]))
    score, flat = rank_candidates(total, torch.tensor([-1.0]), 4)
    assert flat.tolist() == [[0, 6, 1, 7]] and torch.allclose(score, torch.tensor([[-1.0, -1.5, -1.1, -1.6]]))


# ----------------------------------------------------------------------- through the server

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "The class statement"]
NEW = 10


@pytest.fixture(scope="module")
def prompt_ids(tiny_gpt2):
    return [tokenizer(tiny_gpt2)(p)["input_ids"] for p in PROMPTS]


def test_greedy_with_per_row_repetition_penalties_equals_hf_generate(surface_server, tiny_gpt2, prompt_ids):
    penalties = [1.0, 1.5, 3.0]
    result = text_infer(surface_server.http_url, PROMPTS, NEW, repetition_penalty=penalties)
    texts = [s.decode() for s in result["sentences"].reshape(-1)]
    for text, ids, penalty in zip(texts, prompt_ids, penalties):
        want = hf_generate(tiny_gpt2, ids, NEW, repetition_penalty=penalty)
        assert text == tokenizer(tiny_gpt2).decode(want, skip_special_tokens=True)


def test_min_length_and_per_request_end_id_equal_hf_generate(surface_server, tiny_gpt2, prompt_ids):
    greedy = hf_generate(tiny_gpt2, prompt_ids[0], NEW)
    end = greedy[len(prompt_ids[0]) + 1]  # a token greedy decoding produces early
    lengths = {}
    for min_length in (0, 4):
        result = token_infer(surface_server.http_url, prompt_ids, NEW, end_id=end, min_length=min_length)
        for row, ids in enumerate(prompt_ids):
            want = hf_generate(tiny_gpt2, ids, NEW, eos_token_id=end, min_new_tokens=min_length)
            got = ours(result, row)
            assert got == want[: len(got)] and (len(got) == len(want) or want[len(got)] == end)
        lengths[min_length] = len(ours(result, 0)) - len(prompt_ids[0])
    assert lengths[0] == 2 and lengths[4] > 4  # the end token came at once, then only after 4 tokens


def test_bad_words_equal_hf_generate(surface_server, tiny_gpt2, prompt_ids):
    greedy = [hf_generate(tiny_gpt2, ids, NEW) for ids in prompt_ids]
    bad = [[[greedy[0][len(prompt_ids[0])]]], [greedy[1][len(prompt_ids[1]) + 2: len(prompt_ids[1]) + 4]], []]
    result = token_infer(surface_server.grpc_url, prompt_ids, NEW, protocol="grpc", bad_words_list=word_list(bad))
    for row, ids in enumerate(prompt_ids):
        want = hf_generate(tiny_gpt2, ids, NEW, bad_words_ids=bad[row] or None)
        assert ours(result, row) == want
    assert ours(result, 0) != greedy[0] and ours(result, 1) != greedy[1] and ours(result, 2) == greedy[2]


def test_presence_penalty_equals_a_hand_written_ft_processor(surface_server, tiny_gpt2, prompt_ids):
    class Presence:  # FT's additive penalty: every token seen so far (prompt included) loses `penalty` once
        def __init__(self, penalty):
            self.penalty = penalty

        def __call__(self, input_ids, scores):
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, input_ids, True)
            return scores - self.penalty * seen

    from transformers import LogitsProcessorList

    result = token_infer(surface_server.http_url, prompt_ids, NEW, presence_penalty=[0.0, 2.0, 5.0])
    for row, (ids, penalty) in enumerate(zip(prompt_ids, [0.0, 2.0, 5.0])):
        want = hf_generate(tiny_gpt2, ids, NEW, logits_processor=LogitsProcessorList([Presence(penalty)]))
        assert ours(result, row) == want


def test_sampled_tokens_lie_where_hf_warpers_keep_them_and_log_probs_match(surface_server, tiny_gpt2, prompt_ids):
    settings = [dict(temperature=0.7, runtime_top_k=8, runtime_top_p=0.0),
                dict(temperature=1.3, runtime_top_k=0, runtime_top_p=0.7),
                dict(temperature=1.0, runtime_top_k=20, runtime_top_p=0.9)]
    inputs = {key: [s[key] for s in settings] for key in settings[0]}
    result = token_infer(surface_server.http_url, prompt_ids, NEW, random_seed=[1, 2, 3], is_return_log_probs=True,
                         **inputs)
    for row, (ids, s) in enumerate(zip(prompt_ids, settings)):
        seq = ours(result, row)
        logits = hf_logits(tiny_gpt2, seq)
        for t in range(len(ids), len(seq)):
            scores = TemperatureLogitsWarper(s["temperature"])(None, logits[t - 1][None].clone())
            logp = torch.log_softmax(scores, -1)[0, seq[t]]
            if s["runtime_top_k"]:
                scores = TopKLogitsWarper(s["runtime_top_k"])(None, scores)
            if s["runtime_top_p"]:
                scores = TopPLogitsWarper(s["runtime_top_p"])(None, scores)
            assert torch.isfinite(scores[0, seq[t]]), (row, t)
            assert abs(float(logp) - result["output_log_probs"][row, 0, t - len(ids)]) < 1e-3
        assert abs(result["output_log_probs"][row, 0].sum() - result["cum_log_probs"][row, 0]) < 1e-3


def test_same_seed_and_prompt_give_the_same_output_whatever_else_is_in_the_batch(surface_server, prompt_ids):
    sampling = dict(runtime_top_k=0, runtime_top_p=0.9, temperature=1.2)
    alone = token_infer(surface_server.http_url, prompt_ids[1:2], NEW, random_seed=42, **sampling)
    mixed = token_infer(surface_server.http_url, [prompt_ids[0], prompt_ids[1], prompt_ids[1]], [NEW, NEW, 4],
                        random_seed=[5, 42, 42], runtime_top_k=[3, 0, 0], runtime_top_p=[0.0, 0.9, 0.9],
                        temperature=[0.5, 1.2, 1.2])
    assert ours(mixed, 1) == ours(alone, 0)
    assert ours(mixed, 2) == ours(alone, 0)[: len(prompt_ids[1]) + 4]
    other_seed = token_infer(surface_server.http_url, prompt_ids[1:2], NEW, random_seed=43, **sampling)
    assert ours(other_seed, 0) != ours(alone, 0)


def test_a_stop_word_ends_its_row_after_the_word(surface_server, tiny_gpt2, prompt_ids):
    greedy = [hf_generate(tiny_gpt2, ids, NEW) for ids in prompt_ids]
    n = len(prompt_ids[0])
    unseen = next(t for t in range(5, 1000) if t not in greedy[0][n:])
    stop = [[[unseen], greedy[0][n + 3: n + 5]], [], []]
    result = token_infer(surface_server.http_url, prompt_ids, NEW, stop_words_list=word_list(stop))
    assert ours(result, 0) == greedy[0][: n + 5] and result["sequence_length"][0, 0] == n + 5
    assert ours(result, 1) == greedy[1] and ours(result, 2) == greedy[2]


@pytest.mark.parametrize("beam_width,len_penalty", [(2, 1.0), (3, 0.0), (4, 2.0)])
def test_beam_search_equals_hf_generate(surface_server, tiny_gpt2, prompt_ids, beam_width, len_penalty):
    greedy = hf_generate(tiny_gpt2, prompt_ids[1], NEW)
    end = greedy[len(prompt_ids[1]) + 2]  # an end token that beams actually meet
    result = token_infer(surface_server.http_url, prompt_ids, NEW, beam_width=beam_width, len_penalty=len_penalty,
                         end_id=end, is_return_log_probs=True)
    assert result["output_ids"].shape[:2] == (3, beam_width)
    for row, ids in enumerate(prompt_ids):
        out = tiny_gpt2_beams(tiny_gpt2, ids, beam_width, len_penalty, end)
        for w in range(beam_width):
            got = ours(result, row, w)
            assert got == out.sequences[w, : len(got)].tolist(), (row, w)
            new_tokens = len(got) - len(ids)
            normalised = result["cum_log_probs"][row, w] / new_tokens ** len_penalty
            assert abs(normalised - float(out.sequences_scores[w])) < 1e-3


def tiny_gpt2_beams(path, ids, beams, len_penalty, end):
    from surface import hf_model

    with torch.no_grad():
        return hf_model(path).generate(torch.tensor([ids]), max_new_tokens=NEW, num_beams=beams,
                                       num_return_sequences=beams, do_sample=False, length_penalty=len_penalty,
                                       eos_token_id=end, pad_token_id=end, return_dict_in_generate=True,
                                       output_scores=True)


def test_the_text_model_returns_every_beam(surface_server, tiny_gpt2, prompt_ids):
    result = text_infer(surface_server.http_url, PROMPTS[:2], NEW, beam_width=3, len_penalty=1.0,
                        is_return_log_probs=True)
    assert result["sentences"].shape == (2, 3, 1) and result["sequence_length"].shape == (2, 3)
    assert result["output_log_probs"].shape == (2, 3, NEW)
    for row, ids in enumerate(prompt_ids[:2]):
        out = tiny_gpt2_beams(tiny_gpt2, ids, 3, 1.0, tokenizer(tiny_gpt2).eos_token_id)
        for w in range(3):
            want = tokenizer(tiny_gpt2).decode(out.sequences[w], skip_special_tokens=True)
            assert result["sentences"][row, w, 0].decode() == want


BAD_TOKEN_REQUESTS = [
    (dict(runtime_top_p=1.5), "runtime_top_p[0] = 1.5 is not allowed: it must be in [0, 1]"),
    (dict(temperature=-1.0), "temperature[0] = -1 is not allowed: it must be > 0"),
    (dict(runtime_top_k=5000), "runtime_top_k[0] = 5000 is not allowed: it must be between 0 and the vocabulary size 1027"),
    (dict(beam_width=64), "beam_width[0] = 64 is not allowed: it must be between 1 and 32"),
    (dict(beam_width=0), "beam_width[0] = 0 is not allowed"),
    (dict(repetition_penalty=1.2, presence_penalty=0.3), "repetition_penalty and presence_penalty are mutually exclusive"),
    (dict(repetition_penalty=0.0), "repetition_penalty[0] = 0 is not allowed: it must be > 0"),
    (dict(end_id=5000), "end_id[0] = 5000 is not allowed: it must be a token id in [0, 1027)"),
    (dict(len_penalty=float("nan")), "len_penalty[0] = nan is not allowed: it must be a finite number"),
    (dict(stop_words_list=np.array([[[5, 6], [3, 1]]], dtype=np.int32)), "stop_words_list[0] offsets [3, 1] must rise"),
    (dict(bad_words_list=np.array([[[5000], [1]]], dtype=np.int32)), "bad_words_list[0] holds token id 5000"),
]


@pytest.mark.parametrize("inputs,message", BAD_TOKEN_REQUESTS, ids=[m.split(" ")[0] for _, m in BAD_TOKEN_REQUESTS])
def test_bad_values_are_refused_with_one_clear_error(surface_server, inputs, message):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=re.escape(message)):
        token_infer(surface_server.http_url, [[5, 6, 7]], 4, **inputs)


def test_bad_prompts_are_refused_and_the_ranks_stay_in_step(surface_server, tiny_gpt2, prompt_ids):
    from pytriton.client.exceptions import PyTritonClientInferenceServerError
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=r"input_ids\[0\] holds token id 5000, outside the vocabulary"):
        token_infer(surface_server.http_url, [[5, 5000]], 4)
    with pytest.raises(InferenceServerException, match=r"request_output_len\[1\] = 0 must be between 1 and 128"):
        token_infer(surface_server.http_url, [[5], [6]], [4, 0])
    with pytest.raises(PyTritonClientInferenceServerError, match="beam_width must be the same for every row"):
        text_infer(surface_server.http_url, PROMPTS[:2], 4, beam_width=[1, 2])
    with pytest.raises(PyTritonClientInferenceServerError, match=r"temperature\[1\] = 0 is not allowed"):
        text_infer(surface_server.http_url, PROMPTS[:2], 4, temperature=[1.0, 0.0])
    result = token_infer(surface_server.http_url, prompt_ids, NEW)  # every rank still serves
    assert [ours(result, r) for r in range(3)] == [hf_generate(tiny_gpt2, ids, NEW) for ids in prompt_ids]
