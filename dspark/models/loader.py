"""Load a target model by registry name, GGUF file or HF safetensors folder.

GGUF sources are converted once into an HF-style folder under the cache
(`$DSPARK_CACHE/models/<name>/`, default `~/.cache/dspark`): config.json, model.safetensors,
tokenizer.json, tokenizer_config.json (with chat_template) and generation_config.json.
Weights are stored dequantized in float32: every GGUF quant type dequantizes to values that
bf16/fp16 cannot always hold exactly, and float32 keeps our logits bit-comparable with
transformers' own GGUF loader (the parity reference). `load_model(dtype=...)` casts on load.
The folder is written to a temporary sibling and renamed, so a crash never leaves a
half-written model behind and concurrent first loads do not corrupt each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from dspark.errors import UserError
from dspark.models import gguf as gguf_io
from dspark.models.config import ModelConfig
from dspark.models.registry import ModelSpec, get_spec, known_models
from dspark.models.tokenizer import Tokenizer
from dspark.models.transformer import CausalLM
from dspark.paths import cache_dir

__all__ = ["LoadedModel", "cache_dir", "known_models", "load_model", "resolve_model_dir"]


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: CausalLM  # eval mode, requires_grad False
    tokenizer: Tokenizer
    path: Path  # the HF-style folder the weights came from
    generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # recommended sampling

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_token_ids



def _log(msg: str) -> None:
    print(f"dspark: {msg}", file=sys.stderr, flush=True)


# -- resolving a name or path to an HF-style folder ------------------------------------------
def resolve_model_dir(name_or_path: str) -> Path:
    """HF-style folder for a registry name, a .gguf file or a checkpoint folder (converting once)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: expected a .gguf file or a checkpoint folder")
        return _converted(_local_gguf_dir(path), lambda tmp: _convert_gguf(path, tmp, None))
    spec = get_spec(name_or_path)
    return _converted(cache_dir() / "models" / spec.name, lambda tmp: _convert_spec(spec, tmp))


def _local_gguf_dir(path: Path) -> Path:
    # Key the cache on the file's identity so an edited or replaced file converts again.
    st = path.resolve().stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"{path.stem}-{key}"


def _converted(target: Path, convert: Any) -> Path:
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        convert(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; keep its copy
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_spec(spec: ModelSpec, out: Path) -> None:
    sources = spec.source_paths()
    if len(sources) == 1:
        _convert_gguf(sources[0], out, spec)
        return
    joined = out / "model.gguf"  # chunks concatenate into one file; deleted after conversion
    _log(f"assembling {spec.name} from {len(sources)} chunks")
    with joined.open("wb") as dst:
        for chunk in sources:
            with chunk.open("rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    try:
        _convert_gguf(joined, out, spec)
    finally:
        joined.unlink(missing_ok=True)


def _convert_gguf(path: Path, out: Path, spec: ModelSpec | None) -> None:
    name = spec.name if spec else path.name
    _log(f"converting {name} to {out.parent / out.name.split('.tmp-')[0].lstrip('.')} (once; ~1 min)")
    start = time.monotonic()
    reader = gguf_io.open_gguf(path)
    config = gguf_io.hf_config(reader)
    safetensors.torch.save_file(dict(gguf_io.iter_tensors(reader, config)), str(out / "model.safetensors"),
                                metadata={"format": "pt", "source": path.name})
    _write_json(out / "config.json", config)
    template = gguf_io.chat_template(reader) or (spec.chat_template if spec else None)
    _write_tokenizer(path, out, template)
    if spec and spec.generation_config:
        _write_json(out / "generation_config.json", spec.generation_config)
    _log(f"converted {name} in {time.monotonic() - start:.0f}s")


def _write_tokenizer(path: Path, out: Path, template: str | None) -> None:
    # transformers' GGUF tokenizer conversion is used here only, once; run time needs only
    # `tokenizers` + jinja2 (see tokenizer.py).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    if template:
        cfg["chat_template"] = template
    _write_json(cfg_path, cfg)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# -- loading a folder --------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_model(cfg: ModelConfig, path: Path, dtype: torch.dtype, device: str) -> CausalLM:
    """CausalLM with the folder's weights; parameters are created on `meta`, so no random init."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        state.update(safetensors.torch.load_file(str(file)))
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: checkpoint does not match a {cfg.family} model "
                        f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})")
    if cfg.tie_word_embeddings:  # assign=True replaced the embedding Parameter: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)
    model.eval().requires_grad_(False)
    return model


def _eos_ids(*values: Any) -> list[int]:
    out: list[int] = []
    for v in values:
        for tid in v if isinstance(v, list) else ([] if v is None else [v]):
            if tid not in out:
                out.append(int(tid))
    return out


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a model for inference (registry name, .gguf file or HF checkpoint folder)."""
    path = resolve_model_dir(name_or_path)
    hf = _read_json(path / "config.json")
    try:
        cfg = ModelConfig.from_hf(hf)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}/config.json: {e}") from e
    generation = _read_json(path / "generation_config.json")
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path} has no tokenizer.json")
    tokenizer = Tokenizer.from_dir(path, _eos_ids(generation.get("eos_token_id"), hf.get("eos_token_id")))
    model = build_model(cfg, path, dtype, device)
    return LoadedModel(name=name_or_path, config=cfg, model=model, tokenizer=tokenizer, path=path,
                       generation_config=generation)
