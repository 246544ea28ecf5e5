"""transformers' own decoding as side-by-side peers: `hf-ar`, `hf-prompt-lookup`, `hf-assisted`.

They load the very same weights (our converted checkpoint folder) and decode one prompt at a
time with `generate`, so the report compares our engine with what users already run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dspark.errors import UserError

HF_METHODS = ("hf-ar", "hf-prompt-lookup", "hf-assisted")


def make_hf_generate(method: str, model_dir: str, dtype: torch.dtype, max_new_tokens: int,
                     eos_ids: tuple[int, ...], block_size: int, draft_dir: str | None,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int | None = None) -> Callable[[list[int]], list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    # Pin every knob a checkpoint's generation_config could otherwise switch on (e.g. Qwen's
    # repetition penalty): the peers must decode exactly what our engine decodes.
    kwargs: dict[str, object] = dict(max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                                     pad_token_id=eos_ids[0] if eos_ids else 0, repetition_penalty=1.0,
                                     no_repeat_ngram_size=0, min_new_tokens=0)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if method == "hf-prompt-lookup":
        kwargs["prompt_lookup_num_tokens"] = block_size
    elif method == "hf-assisted":
        if draft_dir is None:
            raise UserError("hf-assisted needs --draft-model")
        kwargs["assistant_model"] = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype).eval()
        kwargs["num_assistant_tokens"] = block_size
        kwargs["num_assistant_tokens_schedule"] = "constant"
    elif method != "hf-ar":
        raise UserError(f"unknown transformers peer {method!r}")

    @torch.inference_mode()
    def generate(prompt_ids: list[int]) -> list[int]:
        if seed is not None:
            torch.manual_seed(seed)
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return out[0, len(prompt_ids):].tolist()

    return generate
