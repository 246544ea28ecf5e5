"""OpenAI bodies: honoured fields map onto the neutral request, every other field is a 400
whose `param` names it (docs/openai-compat.md)."""

from __future__ import annotations

import pytest

from services.security.openai_wire import from_openai
from services.security.validation import RequestError, RequestLimits, validate_request

LIMITS = RequestLimits(max_context=64, max_new_tokens=32, default_max_new_tokens=8, vocab_size=1000,
                       models=frozenset({"tiny"}), methods=frozenset({"ngram"}), max_block_size=7,
                       verify_policies=frozenset({"fixed"}))
CHAT = [{"role": "user", "content": "hi"}]


def valid(body: dict, chat: bool = True):  # noqa: ANN201
    return validate_request(from_openai(body, chat), LIMITS)


def refused_param(body: dict, chat: bool = True) -> str | None:
    with pytest.raises(RequestError) as info:
        valid(body, chat)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.param and info.value.param.split(".")[0].split("[")[0] in info.value.message or \
        info.value.param in info.value.message
    return info.value.param


def test_sampling_fields_are_honoured() -> None:
    r = valid({"messages": CHAT, "stop": "\n", "n": 3, "presence_penalty": 0.5, "frequency_penalty": -1,
               "logit_bias": {"12": 5, "7": -100}, "seed": -1, "logprobs": True, "top_logprobs": 2,
               "max_completion_tokens": 9, "stream": True, "stream_options": {"include_usage": True}})
    assert (r.stop, r.n, r.presence_penalty, r.frequency_penalty) == (("\n",), 3, 0.5, -1.0)
    assert r.logit_bias == ((7, -100.0), (12, 5.0)) and r.seed == 2**64 - 1
    assert (r.logprobs, r.max_new_tokens, r.stream, r.include_usage) == (2, 9, True, True)
    assert r.temperature == 1.0  # OpenAI's default
    c = valid({"prompt": "x", "logprobs": 3, "stop": ["a", "bc"]}, chat=False)
    assert c.logprobs == 3 and c.stop == ("a", "bc")


def test_content_parts_and_developer_role() -> None:
    r = valid({"messages": [{"role": "developer", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "text", "text": "b"}]}]})
    assert r.messages == (("system", "be brief"), ("user", "a\nb"))


def test_no_op_values_of_refused_fields_are_accepted() -> None:
    valid({"messages": CHAT, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
           "store": False, "n": 1, "user": "u1", "service_tier": "auto", "parallel_tool_calls": True})
    valid({"prompt": "x", "echo": False, "best_of": 1, "suffix": None}, chat=False)


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"store": True}, "store"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"echo": True}, "echo"),  # a completions field
    ({"temperature": 2.5}, "temperature"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"5000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages[0].content[0].type"),
])
def test_refused_fields_name_themselves(body: dict, param: str) -> None:
    assert refused_param({"messages": CHAT, **body}) == param


@pytest.mark.parametrize("body, param", [
    ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"), ({"logprobs": 6}, "logprobs"),
    ({"messages": CHAT}, "messages"), ({"prompt": ["a", "b"]}, "prompt"), ({"top_logprobs": 1}, "top_logprobs"),
])
def test_completions_refusals(body: dict, param: str) -> None:
    assert refused_param({"prompt": "x", **body}, chat=False) == param


def test_speculation_options_are_checked_against_the_fleet() -> None:
    raw = {"text": "a", "block_size": 3, "verify_policy": "fixed", "method": "ngram"}
    assert validate_request(raw, LIMITS).block_size == 3
    for bad, param in [({"block_size": 8}, "block_size"), ({"block_size": -1}, "block_size"),
                       ({"verify_policy": "bogus"}, "verify_policy"), ({"method": "ar"}, "method"),
                       ({"confidence_threshold": 0.3}, "confidence_threshold")]:
        with pytest.raises(RequestError) as info:
            validate_request({"text": "a", **bad}, LIMITS)
        assert info.value.param == param
