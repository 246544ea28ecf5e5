"""Stop strings: the text a client may see, cut before the first stop string.

One `TextStream` per request turns committed token ids into final text incrementally. The
embedded engine (`Engine._emit`) and the fleet router (`services/router/loop.py`, Resume
included) both use it, so a stop string ends a request the same way everywhere:

- the output's tokens end with the token whose text completes the first stop string (later
  tokens of the same chunk, e.g. drafts a speculative round accepted past the stop, are
  dropped: `TextDelta.num_tokens` says how many of a chunk's tokens belong to the output);
- the output's text ends right before that stop string (OpenAI's rule: the stop string
  itself is not returned);
- text that could still become the start of a stop string is held back until the next
  tokens decide it, so a stop string split across chunks never leaks partly.

Matching runs on the text after incremental detokenization (special tokens skipped), the
same text the client receives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dspark.models.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class TextDelta:
    num_tokens: int  # how many of the pushed tokens belong to the output (all unless a stop string ended it)
    text: str  # newly final text: never any part of a stop string, nor what follows one
    stopped: bool  # a stop string ended the output


class TextStream:
    """Incremental detokenizer with stop strings.

    Invariant: `text` + held-back text == decode(tokens pushed so far), cut before the first
    stop string once one has appeared. Held-back text is the longest suffix that is a
    proper prefix of some stop string; any later occurrence must start inside it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.decoder = tokenizer.stream_decoder()
        self.stop = tuple(stop)
        self.text = ""  # everything emitted so far
        self.held = ""  # decoded, not yet emitted: may be the start of a stop string
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> TextDelta:
        """Add committed tokens; returns the new final text and how many tokens to keep."""
        if self.stopped:
            return TextDelta(0, "", True)
        if not self.stop:  # nothing to match: decode the chunk at once
            delta = self.decoder.push(list(token_ids))
            self.text += delta
            return TextDelta(len(token_ids), delta, False)
        out = []
        for i, token in enumerate(token_ids):
            self.held += self.decoder.push([token])
            at = self._first_stop()
            if at is not None:
                out.append(self.held[:at])
                return self._emit(out, i + 1, stopped=True)
            safe = len(self.held) - self._prefix_len()
            out.append(self.held[:safe])
            self.held = self.held[safe:]
        return self._emit(out, len(token_ids), stopped=False)

    def flush(self) -> str:
        """At a finish that was not a stop string (EOS, length): release held-back text."""
        if self.stopped:
            return ""
        self.held += self.decoder.flush()
        at = self._first_stop()
        rest = self.held if at is None else self.held[:at]
        self.stopped = at is not None
        self.held = ""
        self.text += rest
        return rest

    def _emit(self, parts: list[str], num_tokens: int, stopped: bool) -> TextDelta:
        delta = "".join(parts)
        self.text += delta
        if stopped:
            self.stopped, self.held = True, ""
        return TextDelta(num_tokens, delta, stopped)

    def _first_stop(self) -> int | None:
        """Start of the earliest stop string in the held-back text."""
        return min((i for s in self.stop if (i := self.held.find(s)) >= 0), default=None)

    def _prefix_len(self) -> int:
        """Length of the longest suffix of `held` that is a proper prefix of a stop string."""
        for n in range(min(len(self.held), max(map(len, self.stop)) - 1), 0, -1):
            tail = self.held[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
