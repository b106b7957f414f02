"""One request's state in the in-flight engine: its tokens, its sampling options, its KV pages.

A request's life: WAITING (queued, or preempted and to be recomputed) -> RUNNING (in the batch:
each step computes some of its tokens, a prefill chunk or one decode token) -> FINISHED. Its
tokens are the prompt followed by what was generated so far; `num_computed` of them have their
keys and values in the cache. A step that computes up to the last token samples the next one.
"""

from __future__ import annotations

import dataclasses
import enum

from ft_runner.engine.sampler import Finish

PENDING = -1  # a token id not yet known on the host (engine/core.py: sampled, on its way)


class Status(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclasses.dataclass
class SamplingOptions:
    """Per-request generation options, with FT's meanings (greedy when top_k <= 1 and top_p == 0)."""

    max_tokens: int = 16  # new tokens at most (FT's request_output_len)
    end_id: int | None = None  # None: the model's end token (with its other end tokens); -1 never ends
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0  # FT / HF: divides seen tokens' positive logits, multiplies negative ones
    presence_penalty: float = 0.0  # FT: subtracted once from every token seen in prompt or output
    frequency_penalty: float = 0.0  # OpenAI / vLLM: subtracted once per occurrence in the output
    min_length: int = 0  # end tokens are forbidden before this many new tokens
    seed: int = 0
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    stop_words: tuple[tuple[int, ...], ...] = ()  # token sequences that end the request (they count as output)
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences the request may not produce

    @property
    def greedy(self) -> bool:
        return self.top_k <= 1 and self.top_p <= 0

    @property
    def needs_history(self) -> bool:
        """Does sampling read the request's tokens so far (penalties, min length, bad words)?"""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.min_length > 0 or bool(self.bad_words))


class Request:
    def __init__(self, request_id: int, prompt: list[int], options: SamplingOptions, end_ids: tuple[int, ...] = ()):
        self.id = request_id
        self.options = options
        self.tokens = [int(t) for t in prompt]  # prompt, then the output so far
        self.num_prompt = len(self.tokens)
        self.num_computed = 0  # tokens whose keys and values are in the cache
        self.block_ids: list[int] = []
        self.logprobs: list[float] = []  # one per output token
        self.status = Status.WAITING
        self.finish = Finish.RUNNING
        self.end_ids = end_ids  # tokens that end it as END_ID (its end_id, and the model's others)
        self.cancelled = False  # set by any thread; the engine acts on it at its next step
        self.registered = 0  # leading pages the block manager has keyed for prefix caching
        self._keys: list[tuple[int, tuple[int, ...]]] = []  # block_key of each full page so far

    def block_key(self, index: int, block_size: int) -> tuple[int, tuple[int, ...]]:
        """Page `index`'s prefix-cache key: its tokens and (through the previous key's hash) every
        token before them, so equal keys mean equal keys and values in that page."""
        while len(self._keys) <= index:
            i = len(self._keys)
            parent = hash(self._keys[-1]) if self._keys else 0
            self._keys.append((parent, tuple(self.tokens[i * block_size:(i + 1) * block_size])))
        return self._keys[index]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def end_id(self) -> int:
        return self.options.end_id

    def append(self, token: int, logprob: float) -> Finish:
        """Record a sampled token; returns (and keeps) the Finish code it leads to."""
        self.tokens.append(PENDING)
        return self.resolve(token, logprob)

    def reserve(self) -> None:
        """A token is being sampled on the device: hold its place (the next step may already read it there)."""
        self.tokens.append(PENDING)

    def resolve(self, token: int, logprob: float) -> Finish:
        """The reserved token has arrived; returns (and keeps) the Finish code it leads to."""
        self.tokens[-1] = int(token)
        self.logprobs.append(float(logprob))
        self.finish = self._finish_after(int(token))
        return self.finish

    @property
    def pending(self) -> bool:
        return self.tokens[-1] == PENDING

    @property
    def done_by_length(self) -> bool:
        """Will it end at its pending token (its last by max_tokens), so that no step need compute that?"""
        return self.num_output >= self.options.max_tokens

    def _finish_after(self, token: int) -> Finish:
        """End token first, then a stop word, then the length limit (FT's order)."""
        if token in self.end_ids and not self.options.ignore_eos:
            return Finish.END_ID
        if any(len(w) and tuple(self.tokens[-len(w):]) == tuple(w) for w in self.options.stop_words):
            return Finish.STOP_WORD
        if self.num_output >= self.options.max_tokens:
            return Finish.LENGTH
        return Finish.RUNNING
