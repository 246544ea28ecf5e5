"""llama.cpp as a side-by-side peer: `llamacpp-ar` and `llamacpp-lookup` (its prompt-lookup
decoding), through llama-cpp-python.

Same weights as ours: the model's own GGUF (the registry's shipped file, or the `.gguf` given
as `--model`) converted by llama.cpp's quantizer (`llama_model_quantize`, requantizing
allowed) to the dtype under test: F32 for float32, BF16 for bfloat16, Q8_0 for our int8
(its closest format: 8-bit weights, one scale per 32 values). Conversions are cached under
`$DSPARK_CACHE/gguf/`. Prompts go in as our token ids (the same vocabulary), so both sides
decode exactly the same tokens.

The package is optional and built from source by `scripts/build-peers.sh`; without it these
methods are skipped with a message.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from dspark.errors import UserError
from dspark.paths import cache_dir

LLAMACPP_METHODS = ("llamacpp-ar", "llamacpp-lookup")
GGUF_TYPES = {"float32": ("F32", 0), "bfloat16": ("BF16", 32), "int8": ("Q8_0", 7)}  # llama_ftype values
LOOKUP_NGRAM = 2  # match the last 2 tokens, as our `ngram` proposer does


def unavailable_reason() -> str | None:
    """Why the llama.cpp peers cannot run here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed; build it with scripts/build-peers.sh (a source build)"
    return None


def source_gguf(model: str) -> Path | None:
    """The GGUF file our weights came from, or None (an HF checkpoint folder has none)."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    from dspark.models.registry import get_spec

    try:
        spec = get_spec(model)
    except UserError:
        return None
    sources = spec.source_paths()
    if len(sources) == 1:
        return sources[0]
    joined = cache_dir() / "gguf" / f"{spec.name}.gguf"  # a model shipped in chunks
    if not joined.is_file():
        joined.parent.mkdir(parents=True, exist_ok=True)
        tmp = joined.with_suffix(f".tmp-{os.getpid()}")
        with tmp.open("wb") as dst:
            for chunk in sources:
                with chunk.open("rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        tmp.replace(joined)
    return joined


def converted_gguf(source: Path, dtype: str) -> Path:
    """`source` converted by llama.cpp to the GGUF type matching `dtype` (cached)."""
    import llama_cpp

    name, ftype = GGUF_TYPES[dtype]
    out = cache_dir() / "gguf" / f"{source.stem}-{name}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp-{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = ftype, True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not convert {source} to {name}")
    tmp.replace(out)
    return out


def make_llamacpp_generate(method: str, gguf: Path, max_new_tokens: int, eos_ids: tuple[int, ...],
                           block_size: int, threads: int, context: int, temperature: float = 0.0,
                           top_p: float = 1.0, top_k: int = 0,
                           seed: int | None = None) -> Callable[[list[int]], list[int]]:
    """prompt ids -> generated ids (stopping after an eos id or `max_new_tokens`)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    if method not in LLAMACPP_METHODS:
        raise UserError(f"unknown llama.cpp peer {method!r}")
    draft = LlamaPromptLookupDecoding(LOOKUP_NGRAM, block_size) if method == "llamacpp-lookup" else None
    llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads,
                draft_model=draft, seed=seed if seed is not None else 0, verbose=False)
    stop = set(eos_ids)

    def generate(prompt_ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in llm.generate(prompt_ids, temp=temperature, top_k=top_k, top_p=top_p, min_p=0.0,
                                  repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if token in stop or len(out) >= max_new_tokens:
                break
        return out

    return generate
