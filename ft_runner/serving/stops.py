"""Stop strings matched on the decoded text, per row, whatever the tokenization (OpenAI's `stop`, the
text models' `stop_words`). The engine matches token sequences only (FT's stop_words_list), so a stop
string split across tokens in an unusual way would slip through it; here each row's new tokens are
decoded as they come and searched.

A request whose rows have all finished (a stop string, an end token or their length) while some row
still generates is given up through its future (Frontend.cancel): the engine stops it within a few
steps, and its Output is not delivered, so what the response needs is kept here. A request that
wants log-probs is not given up (only the Output has them): it runs to its end and is trimmed.
"""

from __future__ import annotations

from ft_runner.engine.sampler import Finish


class StopWatch:
    """Each row's generated tokens and text, cut before the first stop string found in it."""

    def __init__(self, tokenizer, stops: list[list[str]]):
        self.tokenizer = tokenizer
        self.stops = [[s for s in row if s] for row in stops]
        rows = len(stops)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.texts = [""] * rows
        self.stopped = [False] * rows  # a stop string ended the row
        self.ended = [False] * rows  # the engine ended the row (end token, length, stop word)
        self.end_tokens = [False] * rows  # ... with an end token, which is not part of the text

    @property
    def any_stops(self) -> bool:
        return any(self.stops)

    def done(self, row: int) -> bool:
        return self.stopped[row] or self.ended[row]

    def step(self, tokens, reasons, running) -> list[int]:
        """Take one engine step (`running`: rows whose token of this step counts); the rows it stopped."""
        newly = []
        for row, token in enumerate(tokens):
            if not running[row] or self.done(row):
                continue
            if reasons[row] == Finish.END_ID:  # an end token: not text
                self.ended[row] = self.end_tokens[row] = True
                continue
            self.tokens[row].append(int(token))
            if self._search(row):
                newly.append(row)
            self.ended[row] = reasons[row] != Finish.RUNNING
        return newly

    def _search(self, row: int) -> bool:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        cuts = [cut for cut in (text.find(s) for s in self.stops[row]) if cut >= 0]
        if cuts:
            text = text[: min(cuts)]
            self.stopped[row] = True
        self.texts[row] = text
        return self.stopped[row]

    def held_back(self, row: int) -> int:
        """Characters at the end of the row's text that a stop string might still claim."""
        if self.done(row) or not self.stops[row]:
            return 0
        return max(len(s) for s in self.stops[row]) - 1

    def should_give_up(self) -> bool:
        """Every row is done and a stop string ended one the engine still runs: stop the job."""
        return all(self.done(r) for r in range(len(self.tokens))) and any(
            s and not e for s, e in zip(self.stopped, self.ended))
