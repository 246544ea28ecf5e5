"""The OpenAI-compatible API as a user of the official `openai` client sees it, against the
real fleet on loopback (`dspark serve`'s LocalFleet): response shapes, streaming and the
usage chunk, stop strings (greedy output = the embedded AR output cut at the stop), target
logprobs, n, penalties, seeds, disconnects, and errors: every refused field is a 400 whose
`param` names it, and 404/405/413 share OpenAI's error shape."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from typing import Any

import openai
import pytest
import torch

from dspark.spec.sampling import SamplingParams
from tests.integration.fleet.conftest import MAX_NEW, PROMPTS
from tests.integration.fleet.helpers import wait_free

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(fleet: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.ports['http']}/v1", api_key="unused",
                         max_retries=0, timeout=300)


# `embedded` (conftest): (target, engine), the embedded engine with the fleet's model and method.


def test_models_and_response_shape(client: openai.OpenAI, fleet: Any) -> None:
    assert [m.id for m in client.models.list().data] == [fleet.cfg.model]
    r = client.chat.completions.create(model=fleet.cfg.model, messages=CHAT, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == fleet.cfg.model and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_") and abs(r.created - time.time()) < 600
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == len(r.choices[0].token_ids) and r.usage.prompt_tokens > 0
    c = client.completions.create(model="", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert c.object == "text_completion" and c.model == fleet.cfg.model and c.choices[0].finish_reason == "length"


def test_stream_has_one_created_and_usage_only_when_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(messages=CHAT, max_tokens=8, temperature=0, model="",
                                                 stream=True))
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks) and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(messages=CHAT, max_tokens=8, temperature=0, model="",
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    whole = client.chat.completions.create(messages=CHAT, max_tokens=8, temperature=0, model="")
    assert text == whole.choices[0].message.content


def test_content_parts_and_developer_role(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    parts = client.chat.completions.create(model="", max_tokens=6, temperature=0, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert parts.choices[0].token_ids == plain.choices[0].token_ids


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_greedy_output_exactly(client: openai.OpenAI, reference: dict[str, list[int]],
                                                embedded: Any, stream: bool) -> None:
    tok = embedded[0].tokenizer
    for prompt in PROMPTS[:2]:
        ref_ids = reference[prompt]
        full = tok.decode(ref_ids, skip_special_tokens=True)
        stop = full[len(full) // 2: len(full) // 2 + 3]  # usually spans tokens and chunks
        cut = next(i for i in range(len(ref_ids) + 1) if stop in tok.decode(ref_ids[:i], skip_special_tokens=True))
        kw = {"model": "", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stop": [stop, "\x00never"]}
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].text for c in chunks)
            ids = [t for c in chunks for t in c.choices[0].token_ids]
            reason = chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(**kw)
            text, ids, reason = r.choices[0].text, r.choices[0].token_ids, r.choices[0].finish_reason
        assert text == full[: full.find(stop)] and stop not in text
        assert ids == ref_ids[:cut] and reason == "stop"


def test_logprobs_are_the_targets(client: openai.OpenAI, embedded: Any) -> None:
    target = embedded[0]
    r = client.chat.completions.create(model="", messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    choice = r.choices[0]
    prompt = target.tokenizer.apply_chat_template(CHAT)
    ids = choice.token_ids
    from dspark.models.runner import ModelRunner, SeqInput

    runner = ModelRunner(target.model, target.model.new_cache(1, 512))
    logits = runner.forward([SeqInput(runner.cache.allocate(), prompt + ids)]).logits[0].float()
    ref = torch.log_softmax(logits[len(prompt) - 1: -1], -1)  # row i predicts ids[i]
    entries = choice.logprobs.content
    assert len(entries) == len(ids)
    for i, (tok, e) in enumerate(zip(ids, entries)):
        assert abs(e.logprob - float(ref[i, tok])) < 1e-4
        assert len(e.top_logprobs) == 3 and abs(e.top_logprobs[0].logprob - float(ref[i].max())) < 1e-4
        assert e.token == target.tokenizer.decode([tok])
    c = client.completions.create(model="", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5 and lp.text_offset[0] == 0


def test_n_choices_and_seed(client: openai.OpenAI) -> None:
    kw = {"model": "", "messages": CHAT, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)
    again = client.chat.completions.create(n=3, **kw)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in r.choices]  # seeded: reproducible
    assert client.chat.completions.create(**kw).choices[0].token_ids == r.choices[0].token_ids
    chunks = list(client.chat.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **kw))
    by_index: dict[int, list[int]] = {0: [], 1: []}
    for ch in chunks[:-1]:
        for c in ch.choices:
            by_index[c.index] += c.token_ids
    assert [by_index[0], by_index[1]] == [c.token_ids for c in r.choices[:2]]


def test_penalties_and_logit_bias_equal_the_embedded_engine(client: openai.OpenAI, embedded: Any) -> None:
    target, engine = embedded
    banned = target.tokenizer.encode(" the")[0]
    r = client.completions.create(model="", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                  frequency_penalty=1.5, presence_penalty=0.5, logit_bias={str(banned): -100})
    params = SamplingParams(max_new_tokens=16, frequency_penalty=1.5, presence_penalty=0.5,
                            logit_bias=((banned, -100.0),))
    [out] = engine.generate([target.tokenizer.encode(PROMPTS[0])], params)
    assert r.choices[0].token_ids == out.token_ids and banned not in out.token_ids


@pytest.mark.parametrize("kw, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 5}, "temperature"),
    ({"n": 100}, "n"),
    ({"extra_body": {"best_of_n": 2}}, "best_of_n"),
    ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ({"store": True}, "store"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_refused_fields_are_400_naming_them(client: openai.OpenAI, kw: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", messages=CHAT, max_tokens=2, **kw)
    err = info.value.body
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_one_error_shape_for_404_405_413(fleet: Any) -> None:
    base = f"http://127.0.0.1:{fleet.ports['http']}"
    for method, path, data, status in [("POST", "/v1/nope", b"{}", 404), ("GET", "/v1/completions", None, 405),
                                       ("POST", "/v1/completions", b"x" * (2 * 2**20), 413)]:
        req = urllib.request.Request(base + path, data, {"Content-Type": "application/json"}, method=method)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == status
        err = json.loads(info.value.read())["error"]
        assert set(err) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as nf:
        openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).completions.create(
            model="no-such-model", prompt="hi", max_tokens=2)
    assert nf.value.body["param"] == "model"


def test_non_streaming_disconnect_frees_the_kv_slot(fleet: Any) -> None:
    before = fleet.metrics.registry.get_sample_value("dspark:request_errors_total",
                                                    {"model": fleet.cfg.model, "code": "CANCELLED"})
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", fleet.ports["http"]), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(4)  # admitted and decoding
    wait_free(fleet, timeout_s=15)  # 400 tokens take minutes here: only a cancel frees it this soon
    after = fleet.metrics.registry.get_sample_value("dspark:request_errors_total",
                                                   {"model": fleet.cfg.model, "code": "CANCELLED"})
    assert after == before + 1
