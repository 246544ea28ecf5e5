"""Real checkpoints against transformers loading the very same GGUF file (float32).

Per model: full-prompt logits within 1e-3, greedy continuations of 10 chat-templated eval
prompts (the first 2 of each shipped eval file; DSPARK_EVAL_DIR overrides the folder) equal to
transformers' `generate(do_sample=False)` on at least 9 of 10
(we decode the 10 as one batch, transformers one by one, so a float near-tie may flip one),
and chat-template ids equal to transformers' `apply_chat_template`.
transformers runs once per model in a module-scoped fixture, and its outputs are cached
under $DSPARK_CACHE/test-refs keyed by the GGUF source files, the prompts, the token count and
the transformers version: a fresh machine recomputes them (minutes), a rerun reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from dspark.models.loader import LoadedModel, load_model
from dspark.models.registry import get_spec
from dspark.paths import cache_dir, eval_dir
from tests.unit.models.helpers import forward_logits, greedy_decode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow

EVAL_DIR = eval_dir()
# (registry name, new tokens per greedy continuation)
MODELS = [("smollm2-135m-instruct", 64), ("gemma3-270m", 64), ("qwen2.5-coder-0.5b-instruct", 64)]


def _eval_prompts() -> list[str]:
    files = sorted(EVAL_DIR.glob("*.jsonl"))
    if not files:
        pytest.skip(f"no eval prompts under {EVAL_DIR}")
    prompts = []
    for f in files:
        lines = f.read_text().splitlines()
        prompts += [json.loads(line)["turns"][0] for line in lines[:2]]
    return prompts[:10]


def _gguf_file(name: str, tmp: Path) -> Path:
    """The model's GGUF as one file (chunked models are concatenated into `tmp`)."""
    sources = get_spec(name).source_paths()
    if len(sources) == 1:
        return sources[0]
    joined = tmp / f"{name}.gguf"
    with joined.open("wb") as dst:
        for chunk in sources:
            with chunk.open("rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    return joined


class Reference:
    def __init__(self, ours: LoadedModel, prompts: list[list[int]], logits: torch.Tensor,
                 continuations: list[list[int]], max_new_tokens: int) -> None:
        self.ours, self.prompts, self.logits = ours, prompts, logits
        self.continuations, self.max_new_tokens = continuations, max_new_tokens


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def ref(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    name, max_new = request.param
    ours = load_model(name)
    prompts = [ours.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in _eval_prompts()]
    key = _reference_key(name, prompts, max_new)
    cached = cache_dir() / "test-refs" / f"{name}-{key}.pt"
    if cached.exists():
        saved = torch.load(cached)
        return Reference(ours, prompts, saved["logits"], saved["continuations"], max_new)
    logits, continuations = _run_transformers(name, prompts, max_new, list(ours.eos_token_ids),
                                              tmp_path_factory.mktemp("gguf"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logits": logits, "continuations": continuations}, cached.with_suffix(".tmp"))
    cached.with_suffix(".tmp").replace(cached)
    return Reference(ours, prompts, logits, continuations, max_new)


def _reference_key(name: str, prompts: list[list[int]], max_new: int) -> str:
    h = hashlib.sha256(f"{transformers.__version__}|{max_new}|{prompts}".encode())
    for src in get_spec(name).source_paths():
        h.update(f"{src.name}|{src.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _run_transformers(name: str, prompts: list[list[int]], max_new: int, eos: list[int],
                      tmp: Path) -> tuple[torch.Tensor, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    path = _gguf_file(name, tmp)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompts[0]])).logits[0]
        continuations = []
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
                              top_k=None, top_p=None, temperature=None)
            continuations.append(out[0, len(p):].tolist())
    del hf
    return logits, continuations


def test_logits_match_transformers(ref: Reference) -> None:
    got = forward_logits(ref.ours.model, ref.prompts[:1], ref.ours.config.sliding_window)[0]
    torch.testing.assert_close(got, ref.logits, atol=1e-3, rtol=0)


def test_greedy_matches_transformers_generate(ref: Reference) -> None:
    ours = greedy_decode(ref.ours.model, ref.prompts, ref.max_new_tokens, ref.ours.eos_token_ids,
                         ref.ours.config.sliding_window)
    same = sum(a == b for a, b in zip(ours, ref.continuations, strict=True))
    assert same >= 9, f"only {same}/10 greedy continuations match transformers"


@pytest.mark.parametrize("system", [False, True])
def test_chat_template_matches_transformers(ref: Reference, system: bool) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Write a haiku about caches. ünïcode 😀"}]
    if system:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    hf_tok = AutoTokenizer.from_pretrained(str(ref.ours.path))
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ref.ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == list(want)
