"""Beam search (beam_width > 1), run on every rank in lock-step like the sampling path.

Semantics are HF transformers' beam search with early_stopping=False, which FT's matches:
- each step, a live beam's next-token log-probs (log-softmax after temperature, penalties, min
  length and bad words) are added to its score, and each row keeps its best 2W continuations.
  FT's diversity rate ranks a candidate by score + rate * (its rank among its parent's candidates);
  the rate changes the ranking only, never the score (FT: a negative rate favours siblings of
  other beams);
- a candidate that ends (end_id, a stop word, or the row's length) and ranks among the first W
  joins the row's finished pool, scored cum_log_prob / generated_length ** len_penalty (the end
  token counts in the length); the pool keeps the best W;
- the first W candidates that did not end are the next live beams;
- a row is done at its length, or when its pool is full and the best live beam, normalised at
  its current length, cannot beat the worst pooled one.
Output, per row and best first: output_ids (B, W, S + steps), sequence_lengths (B, W), the raw
cum_log_probs (B, W), output_log_probs (B, W, steps), finish_reason (B, W).

The last pipeline stage ranks the candidates and broadcasts them ((B, 2W) scores and ids); every
rank then does the same bookkeeping, so all agree on the beams, the KV-cache order and the stop.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from ft_runner.engine.generator import Batch, Generator, Output
from ft_runner.engine.sampler import DecodeState, finish_codes

DEAD = -1e9  # score of a beam that cannot continue (HF's convention; -inf would give NaNs)


def generate(gen: Generator, batch: Batch) -> Output:
    """Each beam width runs as its own group; rows with width 1 take the sampling path."""
    parts = []
    for width in np.unique(batch.beam_width):
        rows = np.flatnonzero(batch.beam_width == width)
        sub = select_rows(batch, rows)
        out = gen.generate(sub) if width == 1 else BeamSearch(gen, sub, int(width)).run()
        parts.append((rows, with_beam_axis(out)))
    return _merge(parts, batch)


def select_rows(batch: Batch, rows: np.ndarray) -> Batch:
    fields = {f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(Batch)}
    fields["input_ids"] = fields["input_ids"][:, : int(fields["lengths"].max())]
    return Batch(**fields)


def repeat_rows(batch: Batch, times: int) -> Batch:
    """Each row `times` times in a row: row b's copies are b*times .. b*times + times - 1."""
    return Batch(**{f.name: np.repeat(getattr(batch, f.name), times, axis=0) for f in dataclasses.fields(Batch)})


def with_beam_axis(out: Output) -> Output:
    """An Output with a beam axis after the batch axis (the sampling path has none)."""
    if out.output_ids.ndim == 3:
        return out
    return Output(*(getattr(out, f.name)[:, None] for f in dataclasses.fields(Output)))


def _merge(parts, batch: Batch) -> Output:
    B = batch.size
    W = max(p.output_ids.shape[1] for _, p in parts)
    T = max(p.output_ids.shape[2] for _, p in parts)
    N = max(p.output_log_probs.shape[2] for _, p in parts)
    out = Output(np.repeat(batch.end_id[:, None, None], W, 1).repeat(T, 2), np.zeros((B, W), np.int64),
                 np.zeros((B, W), np.float32), np.zeros((B, W, N), np.float32), np.zeros((B, W), np.int64))
    for rows, part in parts:
        w, t, n = part.output_ids.shape[1], part.output_ids.shape[2], part.output_log_probs.shape[2]
        out.output_ids[rows, :w, :t] = part.output_ids
        out.output_ids[rows, :w, t:] = batch.end_id[rows, None, None]
        out.sequence_lengths[rows, :w] = part.sequence_lengths
        out.cum_log_probs[rows, :w] = part.cum_log_probs
        out.output_log_probs[rows, :w, :n] = part.output_log_probs
        out.finish_reason[rows, :w] = part.finish_reason
    return out


@dataclasses.dataclass
class _Pool:
    """Each row's best W finished hypotheses, best first."""

    score: torch.Tensor  # (B, W) normalised; -inf where empty
    tokens: torch.Tensor  # (B, W, max_new)
    logprobs: torch.Tensor  # (B, W, max_new)
    length: torch.Tensor  # (B, W) new tokens
    reason: torch.Tensor  # (B, W) Finish codes

    @classmethod
    def empty(cls, B: int, W: int, max_new: int, device) -> "_Pool":
        return cls(torch.full((B, W), float("-inf"), device=device),
                   torch.zeros((B, W, max_new), dtype=torch.int64, device=device),
                   torch.zeros((B, W, max_new), dtype=torch.float32, device=device),
                   torch.zeros((B, W), dtype=torch.int64, device=device),
                   torch.zeros((B, W), dtype=torch.int64, device=device))

    def add(self, score, tokens, logprobs, length, reason) -> None:
        """Merge candidates (B, K) (-inf score = not eligible) and keep the best W."""
        W = self.score.shape[1]
        merged = [torch.cat(pair, dim=1) for pair in zip(
            (self.score, self.tokens, self.logprobs, self.length, self.reason),
            (score, tokens, logprobs, length, reason))]
        keep = merged[0].topk(W, dim=1).indices
        self.score, self.tokens, self.logprobs, self.length, self.reason = (_take(t, keep) for t in merged)

    @property
    def full(self) -> torch.Tensor:
        return torch.isfinite(self.score).all(dim=1)


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, K, ...) -> (B, len(index[b]), ...) picking index[b] in row b."""
    shape = (*index.shape, *tensor.shape[2:])
    return tensor.gather(1, index.view(*index.shape, *[1] * (tensor.dim() - 2)).expand(shape))


class BeamSearch:
    def __init__(self, gen: Generator, batch: Batch, width: int):
        self.gen, self.batch, self.W = gen, batch, width
        self.B = batch.size
        self.flat = repeat_rows(batch, width)  # B*W rows
        self.vocab = gen.model.config.vocab_size

    @torch.inference_mode()
    def run(self) -> Output:
        gen, B, W, dev, flat = self.gen, self.B, self.W, self.gen.device, self.flat
        max_new = int(self.batch.output_lens.max())
        lengths = torch.from_numpy(flat.lengths).to(dev)
        end_id = torch.from_numpy(flat.end_id).to(dev)
        out_lens = torch.from_numpy(self.batch.output_lens).to(dev)
        params = gen._params(flat)
        len_penalty = torch.from_numpy(self.batch.len_penalty).to(dev)
        state = DecodeState(flat, self.vocab, dev)
        cache = gen._cache(B * W, max(flat.input_ids.shape[1], int((flat.lengths + flat.output_lens).max())))
        ids = torch.from_numpy(flat.input_ids).to(dev)
        positions = torch.arange(ids.shape[1], device=dev).expand(B * W, -1)
        logits = gen._forward(ids, positions, lengths, cache, lengths - 1, prefill=True)

        running = torch.full((B, W), DEAD, device=dev)
        running[:, 0] = 0.0  # all beams start equal: only the first may expand at step 0
        tokens = torch.zeros((B, W, max_new), dtype=torch.int64, device=dev)
        logprobs = torch.zeros((B, W, max_new), dtype=torch.float32, device=dev)
        pool = _Pool.empty(B, W, max_new, dev)
        improvable = torch.ones(B, dtype=torch.bool, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        steps = 0
        for step in range(max_new):
            score, parent, token = self._candidates(logits, state, params, step, end_id, running)
            rows = torch.arange(B, device=dev)[:, None] * W + parent  # (B, 2W) flat parent rows
            ended = self._ended(state, rows, token, step, out_lens, end_id)
            cand_tokens, cand_lp = _take(tokens, parent), _take(logprobs, parent)
            cand_tokens[:, :, step] = token
            cand_lp[:, :, step] = score - running.gather(1, parent)
            first_w = torch.arange(2 * W, device=dev)[None, :] < W
            eligible = (ended > 0) & first_w & (improvable & ~done)[:, None]
            normalised = score / float(step + 1) ** len_penalty[:, None]
            pool.add(torch.where(eligible, normalised, float("-inf")), cand_tokens, cand_lp,
                     torch.full_like(parent, step + 1), ended)
            steps += 1
            # the next live beams: the first W candidates that did not end
            pick = torch.sort((ended > 0).to(torch.int64), dim=1, stable=True).indices[:, :W]
            running = torch.where(_take(ended, pick) > 0, DEAD, _take(score, pick))
            tokens, logprobs = _take(cand_tokens, pick), _take(cand_lp, pick)
            best = running.max(dim=1).values / float(step + 1) ** len_penalty
            worst = torch.where(pool.full, pool.score.min(dim=1).values, float("-inf"))
            improvable &= best > worst
            done |= ~improvable | (step + 1 >= out_lens)
            if bool(done.all()):
                break
            source = _take(rows, pick).reshape(-1)
            new = tokens[:, :, step].reshape(-1)
            _reorder_cache(cache, source)
            state.reorder(source)
            state.append(new)
            pos = (lengths + step).clamp_max(cache.k.shape[3] - 1)  # done rows idle in their last slot
            logits = gen._forward(new[:, None], pos[:, None], pos, cache, torch.zeros_like(pos), prefill=False)
        return self._output(pool, steps)

    def _candidates(self, logits, state, params, step, end_id, running):
        """The best 2W continuations of each row, in rank order: raw scores, parent beams, tokens."""
        B, W, K = self.B, self.W, 2 * self.W
        dev = running.device
        if logits is not None:
            logp = torch.log_softmax(state.process(logits, params, step, end_id), dim=-1)
            total = logp.view(B, W, -1) + running[:, :, None]
            score, flat_id = rank_candidates(total, torch.from_numpy(self.batch.diversity_rate).to(dev), K)
        else:
            score = torch.empty((B, K), dtype=torch.float32, device=dev)
            flat_id = torch.empty((B, K), dtype=torch.int64, device=dev)
        grid = self.gen.grid
        if grid.world > 1:
            dist.broadcast(score, src=grid.sampler_rank)
            dist.broadcast(flat_id, src=grid.sampler_rank)
        return score, flat_id // self.vocab, flat_id % self.vocab

    def _ended(self, state, rows, token, step, out_lens, end_id):
        """Finish codes (B, 2W) of the candidates (0 = goes on)."""
        stop = state.ends_with_stop_word(token.reshape(-1), rows.reshape(-1)).view(token.shape)
        at_length = (step + 1 >= out_lens)[:, None].expand_as(token)
        return finish_codes(token, stop, at_length, end_id.view(self.B, self.W)[:, :1])

    def _output(self, pool: _Pool, steps: int) -> Output:
        batch, B, W = self.batch, self.B, self.W
        S = batch.input_ids.shape[1]
        length = pool.length.cpu().numpy()
        tokens, lp = pool.tokens.cpu().numpy(), pool.logprobs.cpu().numpy()
        out_ids = np.repeat(batch.end_id[:, None, None], W, 1).repeat(S + steps, 2)
        lp_out = np.zeros((B, W, steps), np.float32)
        for b in range(B):
            n = batch.lengths[b]
            for w in range(W):
                k = length[b, w]
                out_ids[b, w, :n] = batch.input_ids[b, :n]
                out_ids[b, w, n:n + k] = tokens[b, w, :k]
                lp_out[b, w, :k] = lp[b, w, :k]
        return Output(out_ids, batch.lengths[:, None] + length, lp_out.sum(axis=2), lp_out,
                      pool.reason.cpu().numpy())


def rank_candidates(total: torch.Tensor, rate: torch.Tensor, count: int):
    """total (B, W, V): each beam's score after each next token -> the best `count` continuations of
    each row, in rank order: (raw scores (B, count), flat ids parent * V + token (B, count)).

    FT's diversity: a candidate ranks by score + rate * (its rank among its own beam's candidates)."""
    B, W, V = total.shape
    top, index = total.topk(min(count, V), dim=-1)  # (B, W, k): each beam's best
    rank = torch.arange(top.shape[2], device=total.device, dtype=top.dtype)
    key = (top + rate[:, None, None] * rank).view(B, -1)
    pick = key.topk(count, dim=1).indices
    score = top.view(B, -1).gather(1, pick).contiguous()
    flat_id = ((pick // top.shape[2]) * V + index.view(B, -1).gather(1, pick)).contiguous()
    return score, flat_id


def _reorder_cache(cache, source: torch.Tensor) -> None:
    """Row i of the KV cache takes over row `source[i]` (in place, so static buffers stay valid)."""
    cache.k.copy_(cache.k.index_select(1, source))
    cache.v.copy_(cache.v.index_select(1, source))

