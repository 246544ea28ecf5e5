"""Stop strings (dspark/engine/stop.py): the text never shows a stop string or anything after
it, a stop split across chunks is held back, and speculative rounds that accept tokens past
the stop leak nothing: greedy output equals AR's, cut at the token that completes the stop."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from dspark.engine.engine import Engine, EngineConfig
from dspark.engine.stop import TextStream
from dspark.models.tokenizer import Tokenizer
from dspark.spec.ngram import NgramProposer
from dspark.spec.proposer import Draft, DraftRequest
from dspark.spec.sampling import SamplingParams
from tests.tiny import tiny_model

V = 96
EOS = V - 1
MODEL = tiny_model("llama", seed=3, vocab_size=V, num_layers=2)


def char_tokenizer() -> Tokenizer:
    """One token per printable ASCII character (ids 0..94) and a special <eos> (95)."""
    vocab = {chr(32 + i): i for i in range(95)} | {"<eos>": EOS}
    backend = Backend(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    return Tokenizer(backend, {"eos_token": "<eos>"}, eos_token_ids=(EOS,))


TOK = char_tokenizer()


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def stream_text(chunks: list[str], stop: tuple[str, ...]) -> tuple[str, list[str], int, bool]:
    s = TextStream(TOK, stop)
    deltas, kept = [], 0
    for c in chunks:
        d = s.push(ids(c))
        deltas.append(d.text)
        kept += d.num_tokens
        if d.stopped:
            break
    deltas.append(s.flush())
    assert "".join(deltas) == s.text
    return s.text, deltas, kept, s.stopped


def test_without_stops_text_is_the_decoded_output() -> None:
    text, _, kept, stopped = stream_text(["Hello", ", wor", "ld"], ())
    assert (text, kept, stopped) == ("Hello, world", 12, False)


def test_stop_split_across_chunks_is_held_back_and_never_emitted() -> None:
    text, deltas, kept, stopped = stream_text(["The end", ".|", "|User: more"], ("||User",))
    assert text == "The end."
    assert stopped and deltas[1] == "."  # "|" waited: it might begin the stop string
    assert kept == len("The end.||User")  # the token completing the stop is the last one kept


def test_earliest_of_several_stops_wins_and_later_tokens_of_the_chunk_are_dropped() -> None:
    s = TextStream(TOK, ("xyz", "b", "cd"))
    d = s.push(ids("a cd b xyz tail"))
    assert (d.text, d.num_tokens, d.stopped) == ("a ", 4, True)
    assert s.push(ids("more")).num_tokens == 0 and s.flush() == ""


def test_a_held_prefix_that_never_completes_is_released() -> None:
    text, deltas, _, stopped = stream_text(["abc|", "|X", "yz"], ("||User",))
    assert deltas[0] == "abc" and text == "abc||Xyz" and not stopped
    text, deltas, _, stopped = stream_text(["abc|"], ("||User",))
    assert deltas == ["abc", "|"] and not stopped  # flushed at a finish that was not a stop


def test_special_tokens_are_not_text() -> None:
    s = TextStream(TOK, ("!",))
    assert s.push([*ids("hi"), EOS]).text == "hi" and s.flush() == ""


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError):
        TextStream(TOK, ("",))


# -- in the engine -------------------------------------------------------------------------

class OracleProposer:
    """Drafts the true greedy continuation: every round accepts all K drafts, so a round that
    completes a stop string always carries accepted tokens past it (the overshoot case)."""

    name, feature_layers = "oracle", ()

    def __init__(self, continuation: dict[tuple[int, ...], list[int]]) -> None:
        self.continuation = continuation  # prompt -> AR output

    def start(self, seq_id: int, prompt_ids: list[int]) -> None: ...
    def finish(self, seq_id: int) -> None: ...

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = []
        for r in requests:
            for prompt, cont in self.continuation.items():
                if list(r.token_ids[: len(prompt)]) == list(prompt):
                    done = len(r.token_ids) - len(prompt)
                    out.append(Draft(cont[done: done + r.max_tokens]))
                    break
        return out


def engine(proposer: object = None, block: int = 4) -> Engine:
    return Engine(MODEL, (EOS,), proposer, EngineConfig(max_batch_size=4, max_seq_len=128, block_size=block),
                  tokenizer=TOK)


PROMPTS = [ids("Once upon"), ids("x = 1;"), ids("ab")]


def test_greedy_with_stop_equals_ar_truncated_for_every_proposer() -> None:
    free = engine().generate(PROMPTS, SamplingParams(max_new_tokens=40, ignore_eos=True))
    ar_ids = {tuple(p): o.token_ids for p, o in zip(PROMPTS, free)}
    for p, out in zip(PROMPTS, free):
        full = TOK.decode(out.token_ids, skip_special_tokens=True)
        stop = full[11:13]  # two characters from the middle: a multi-token stop string
        at = full.find(stop)
        cut = next(i for i in range(len(out.token_ids) + 1)
                   if stop in TOK.decode(out.token_ids[:i], skip_special_tokens=True))
        expected_ids = out.token_ids[:cut]
        params = SamplingParams(max_new_tokens=40, ignore_eos=True, stop=(stop, "never-there"))
        for proposer in (None, NgramProposer(), OracleProposer(ar_ids)):
            [got] = engine(proposer, block=7).generate([p], params)
            assert got.token_ids == expected_ids, proposer
            assert got.text == full[:at] and got.finish_reason == "stop"
            if isinstance(proposer, OracleProposer):
                assert got.num_accepted > len(got.token_ids) - 1 - got.num_verify_steps  # it overshot


def test_stop_strings_need_a_tokenizer() -> None:
    from dspark.errors import UserError

    with pytest.raises(UserError, match="tokenizer"):
        Engine(MODEL, (EOS,)).generate([[1, 2]], SamplingParams(stop=("a",)))


def test_length_finish_releases_held_text() -> None:
    [out] = engine().generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, ignore_eos=True, stop=("\x7f",)))
    assert out.finish_reason == "length" and out.text == TOK.decode(out.token_ids, skip_special_tokens=True)
