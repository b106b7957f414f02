"""Per-row logits processing and sampling with no host sync.

Processing follows FT's BaseSamplingLayer order: temperature, then the repetition (multiplicative)
or presence (additive) penalty, then min_length, then bad words. Top-k / top-p filtering and the
draw come last. Log-probs are those of the processed logits over the whole vocabulary (before
top-k / top-p), so `cum_log_probs` scores a sequence the same way whatever the filter.

Random draws come from a counter-based hash of (seed, step, token id), so a row's tokens depend
only on its own seed and logits, never on its batch neighbours or on the device's RNG state.

Word lists use FT's format: per row a (2, L) int array; row 0 holds the token ids of all words
concatenated (zero-padded), row 1 the cumulative end offset of each word (padded with -1).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Sequence

import numpy as np
import torch

from ft_runner.engine.transfer import to_device


class Finish(enum.IntEnum):
    """Why a row stopped; RUNNING (0) while it has not."""

    RUNNING = 0
    LENGTH = 1
    END_ID = 2
    STOP_WORD = 3
    CANCELLED = 4  # its request went away (engine/generator.py: `cancelled`)

    @property
    def label(self) -> str:
        return {0: "", 1: "length", 2: "end_id", 3: "stop_word", 4: "cancelled"}[int(self)]


@dataclasses.dataclass
class SamplingParams:
    """One value per row, as tensors of shape (B,) on the model's device."""

    top_k: torch.Tensor  # int64; 0 = no top-k filter
    top_p: torch.Tensor  # float32; 0 = no top-p filter
    temperature: torch.Tensor  # float32, > 0
    repetition_penalty: torch.Tensor  # float32; 1 = off
    presence_penalty: torch.Tensor  # float32; 0 = off
    min_length: torch.Tensor  # int64: end_id is forbidden before this many new tokens
    seed: torch.Tensor  # int64

    @property
    def greedy(self) -> torch.Tensor:
        """FT: top_k in {0, 1} with top_p == 0 means greedy."""
        return (self.top_k <= 1) & (self.top_p <= 0)


# ---------------------------------------------------------------------------------------------
# word lists


def parse_word_list(array: np.ndarray) -> list[list[int]]:
    """One row's FT word list (2, L) -> its words as token lists (an empty list for `[[0], [-1]]`)."""
    ids, offsets = np.asarray(array)
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        words.append([int(t) for t in ids[start:end]])
        start = int(end)
    return [w for w in words if w]


def to_word_list(words: Sequence[Sequence[int]], width: Optional[int] = None) -> np.ndarray:
    """Words as token lists -> FT's (2, L) int64 array; L = `width` or the total token count."""
    flat = [int(t) for word in words for t in word]
    width = len(flat) if width is None else width
    out = np.zeros((2, width), dtype=np.int64)
    out[1] = -1
    out[0, : len(flat)] = flat
    ends = np.cumsum([len(w) for w in words if w]).astype(np.int64)
    out[1, : len(ends)] = ends
    return out


def word_list_batch(value, rows: int) -> np.ndarray:
    """Per-row word lists (None, a list of word lists, or FT arrays (2, L) / (B, 2, L)) -> (B, 2, L)."""
    if value is None:
        return np.zeros((rows, 2, 0), dtype=np.int64)
    if isinstance(value, np.ndarray) or torch.is_tensor(value):
        array = np.asarray(value, dtype=np.int64)
        return np.broadcast_to(array, (rows, *array.shape[-2:])).copy() if array.ndim == 2 else array
    lists = [list(v or []) for v in value]
    width = max([sum(len(w) for w in words) for words in lists] + [0])
    return np.stack([to_word_list(words, width) for words in lists]) if lists else np.zeros((0, 2, 0), np.int64)


class _WordMatcher:
    """Every row's words, right-aligned in (B, N, L) with -1 where a word is shorter than L."""

    def __init__(self, words: torch.Tensor, present: torch.Tensor):
        self.words, self.present = words, present
        self.width = words.shape[2]

    @classmethod
    def build(cls, lists: np.ndarray, device) -> Optional["_WordMatcher"]:
        rows = [parse_word_list(row) for row in lists]
        count = max([len(r) for r in rows] + [0])
        if count == 0:
            return None
        width = max(len(w) for r in rows for w in r)
        words = np.full((len(rows), count, width), -1, dtype=np.int64)
        present = np.zeros((len(rows), count), dtype=bool)
        for b, row in enumerate(rows):
            for n, word in enumerate(row):
                words[b, n, width - len(word):] = word
                present[b, n] = True
        return cls(torch.from_numpy(words).to(device), torch.from_numpy(present).to(device))

    def matches(self, tail: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """(B, N): word n of row b equals the end of `tail` (B, K); `words` (B, N, K), -1 = any."""
        return (((words == tail[:, None, :]) | (words < 0)).all(dim=-1)) & self.present


class DecodeState:
    """What logits processing remembers of each row: token counts for the penalties, and the
    sequence so far (prompt and output) for bad and stop words. Rows can be reordered (beams)."""

    def __init__(self, batch, vocab: int, device, max_new: Optional[int] = None):
        max_new = int(batch.output_lens.max()) if max_new is None else max_new
        self.vocab, self.device = vocab, device
        self.positions = torch.from_numpy(batch.lengths).to(device)  # (B,): where each row's next token goes
        penalties = (batch.repetition_penalty != 1).any() or (batch.presence_penalty != 0).any()
        self.counts = _prompt_counts(batch, vocab, device) if penalties else None
        self.bad = _WordMatcher.build(batch.bad_words, device)
        self.stop = _WordMatcher.build(batch.stop_words, device)
        self.tokens = None
        if self.bad is not None or self.stop is not None:
            B, S = batch.input_ids.shape
            tokens = np.full((B, S + max_new + 1), -2, dtype=np.int64)
            tokens[:, :S] = np.where(np.arange(S)[None, :] < batch.lengths[:, None], batch.input_ids, -2)
            self.tokens = torch.from_numpy(tokens).to(device)

    def process(self, logits, params: SamplingParams, generated: int, end_id: torch.Tensor) -> torch.Tensor:
        """logits (B, V) fp32 -> processed logits (temperature, penalties, min length, bad words)."""
        logits = logits / params.temperature[:, None]
        if self.counts is not None:
            seen = self.counts > 0
            rep = params.repetition_penalty[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
            logits = logits - params.presence_penalty[:, None] * seen.to(logits.dtype)
        vocab_ids = torch.arange(logits.shape[1], device=logits.device)[None, :]
        too_short = (generated < params.min_length)[:, None]
        logits = logits.masked_fill(too_short & (vocab_ids == end_id[:, None]), float("-inf"))
        if self.bad is not None:
            logits = self._ban_bad_words(logits)
        return logits

    def _ban_bad_words(self, logits):
        """FT / HF: a word's last token is banned when the sequence ends with the word's other tokens."""
        words = self.bad.words
        hit = self.bad.matches(self._tail(words.shape[2] - 1), words[:, :, :-1]) if words.shape[2] > 1 \
            else self.bad.present
        last = words[:, :, -1].clamp_min(0)  # (B, N)
        ban = torch.zeros_like(logits).scatter_add_(1, last, hit.to(logits.dtype)) > 0
        return logits.masked_fill(ban, float("-inf"))

    def _tail(self, k: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, k): the last k tokens of each row (or of `rows`), -2 before the sequence start."""
        positions = self.positions if rows is None else self.positions[rows]
        tokens = self.tokens if rows is None else self.tokens[rows]
        index = positions[:, None] - k + torch.arange(k, device=tokens.device)[None, :]
        tail = tokens.gather(1, index.clamp_min(0))
        return tail.masked_fill(index < 0, -2)

    def ends_with_stop_word(self, tokens: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n,): would appending `tokens` to each row (or to `rows`) complete one of its stop words?"""
        if self.stop is None:
            return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        tail = torch.cat([self._tail(self.stop.width - 1, rows), tokens[:, None]], dim=1)
        if rows is None:
            return self.stop.matches(tail, self.stop.words).any(dim=1)
        matcher = _WordMatcher(self.stop.words[rows], self.stop.present[rows])
        return matcher.matches(tail, matcher.words).any(dim=1)

    def append(self, tokens: torch.Tensor) -> None:
        """Record each row's new token (B,)."""
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))
        if self.tokens is not None:
            self.tokens.scatter_(1, self.positions[:, None], tokens[:, None])
        self.positions = self.positions + 1

    def finish(self, tokens, step: int, output_lens, end_id) -> torch.Tensor:
        """Append this step's tokens; the Finish code (B,) each would give a running row."""
        stop = self.ends_with_stop_word(tokens)
        self.append(tokens)
        return finish_codes(tokens, stop, step + 1 >= output_lens, end_id)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i takes over the history of row `rows[i]` (beam search)."""
        self.positions = self.positions[rows]
        if self.counts is not None:
            self.counts = self.counts[rows]
        if self.tokens is not None:
            self.tokens = self.tokens[rows]
        for matcher in (self.bad, self.stop):
            if matcher is not None:
                matcher.words, matcher.present = matcher.words[rows], matcher.present[rows]


def finish_codes(tokens, stop_hit, at_length, end_id) -> torch.Tensor:
    """Finish code per row: end_id first, then a stop word, then the length limit."""
    codes = torch.where(at_length, int(Finish.LENGTH), int(Finish.RUNNING))
    codes = torch.where(stop_hit, int(Finish.STOP_WORD), codes)
    return torch.where(tokens == end_id, int(Finish.END_ID), codes).to(torch.int64)


def _prompt_counts(batch, vocab: int, device) -> torch.Tensor:
    """(B, V) float32: how often each token occurs in each row's prompt."""
    B, S = batch.input_ids.shape
    valid = np.arange(S)[None, :] < batch.lengths[:, None]
    counts = np.zeros((B, vocab), dtype=np.float32)
    np.add.at(counts, (np.repeat(np.arange(B), S)[valid.ravel()], batch.input_ids[valid]), 1)
    return torch.from_numpy(counts).to(device)


# ---------------------------------------------------------------------------------------------
# sampling


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash on int64 tensors holding 32-bit values."""
    mask = 0xFFFFFFFF
    x = x & mask
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & mask
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step, vocab: int) -> torch.Tensor:
    """(B, vocab) uniforms in (0, 1), a pure function of (seed, step, token id); `step` is one
    number for every row or (B,) per row (the in-flight engine: each row's own output count)."""
    ids = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    step = torch.as_tensor(step, device=seed.device)
    step = step[:, None] if step.dim() == 1 else step
    h = _hash32(seed[:, None] * 0x9E3779B1 + _hash32(ids[None, :] + step * 0x632BE5AB))
    h = _hash32(h ^ (seed[:, None] >> 32))
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def sample(logits: torch.Tensor, params: SamplingParams, step):
    """Processed logits (B, V) fp32 -> (tokens (B,), log-probs of those tokens (B,))."""
    logprobs = torch.log_softmax(logits, dim=-1)
    filtered = filter_top_k_top_p(logits, params.top_k, params.top_p)
    gumbel = -torch.log(-torch.log(uniform(params.seed, step, logits.shape[1]))).to(logits.dtype)
    drawn = torch.argmax(filtered + gumbel, dim=-1)
    tokens = torch.where(params.greedy, torch.argmax(logits, dim=-1), drawn)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


def filter_top_k_top_p(logits, top_k, top_p):
    """-inf outside each row's top-k, then outside the smallest top-p mass of what is left (FT's
    top-k-then-top-p; HF's TopK then TopP warpers). Rows with 0 keep everything."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
    drop |= (top_p[:, None] > 0) & (before >= top_p[:, None])
    drop[:, 0] = False  # always keep the best token
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


# ---------------------------------------------------------------------------------------------
# the in-flight engine: one row per request, each with its own options and history


def sample_requests(logits: torch.Tensor, requests: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (S, V) fp32 of S requests (engine/request.py) -> (next tokens, their log-probs), (S,)
    each on the logits' device (no host sync).

    The same processing as the batch path (temperature, penalties, min length, bad words, then
    top-k / top-p and the seeded draw), with each row's draw keyed by its own output count, so a
    request's tokens do not depend on which others share its step."""
    options = [r.options for r in requests]
    device = logits.device
    temperature = to_device([o.temperature for o in options], device, torch.float32)
    logits = logits / temperature[:, None]
    if all(o.greedy and not o.needs_history for o in options):  # the common case: no sort, no draw
        tokens = torch.argmax(logits, dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    history = [i for i, o in enumerate(options) if o.needs_history]
    if history:
        rows = to_device(history, device)
        logits[rows] = _apply_history(logits[rows], [requests[i] for i in history])
    params = SamplingParams(
        top_k=to_device([o.top_k for o in options], device, torch.int64),
        top_p=to_device([o.top_p for o in options], device, torch.float32),
        temperature=temperature, repetition_penalty=temperature, presence_penalty=temperature,  # not read by sample
        min_length=to_device([o.min_length for o in options], device, torch.int64),
        seed=to_device([o.seed for o in options], device, torch.int64))
    steps = to_device([r.num_output for r in requests], device, torch.int64)
    return sample(logits, params, steps)


def _apply_history(logits: torch.Tensor, requests: list) -> torch.Tensor:
    """Penalties, min length and bad words for rows whose options read their tokens so far; `logits`
    are divided by the temperature already (FT applies its penalties after it)."""
    counts = _token_counts(logits, [r.tokens for r in requests])
    output_counts = _token_counts(logits, [r.output for r in requests])
    column = lambda name: to_device([getattr(r.options, name) for r in requests],  # noqa: E731
                                    logits.device, torch.float32)[:, None]
    seen = counts > 0
    rep = column("repetition_penalty")
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - column("presence_penalty") * seen.to(logits.dtype)
    # OpenAI's definition: on the logits before temperature (those here are already divided by it)
    logits = logits - column("frequency_penalty") * output_counts / column("temperature")
    banned = [(row, token) for row, r in enumerate(requests) for token in _banned(r)]
    if banned:
        rows, tokens = zip(*banned)
        logits[to_device(rows, logits.device, torch.int64), to_device(tokens, logits.device, torch.int64)] = float("-inf")
    return logits


def _token_counts(logits: torch.Tensor, sequences: list[list[int]]) -> torch.Tensor:
    """(rows, V) fp32: how often each token occurs in each row's sequence."""
    counts = torch.zeros_like(logits)
    ids = [t for seq in sequences for t in seq]
    if ids:
        rows = to_device([row for row, seq in enumerate(sequences) for _ in seq], logits.device, torch.int64)
        counts.index_put_((rows, to_device(ids, logits.device, torch.int64)),
                          torch.ones(len(ids), device=logits.device), accumulate=True)
    return counts


def _banned(request) -> list[int]:
    """Tokens the request may not sample now: its end tokens before min_length, and the last
    token of each bad word whose other tokens end the sequence (FT, HF)."""
    banned = list(request.end_ids) if request.num_output < request.options.min_length else []
    tokens = request.tokens
    for word in request.options.bad_words:
        head = tuple(word[:-1])
        if not head or tuple(tokens[len(tokens) - len(head):]) == head:
            banned.append(word[-1])
    return banned
