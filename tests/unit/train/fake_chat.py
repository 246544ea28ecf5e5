"""A ChatML-like tokenizer over integer "words", for target-cache and trainer tests."""

from __future__ import annotations

import random

START, END, NL, USER, ASSISTANT, SYSTEM = 90, 91, 92, 85, 86, 87
ROLES = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}


class FakeChatTokenizer:
    eos_token_ids = (END,)

    def encode(self, text: str) -> list[int]:
        return [int(w) for w in text.split()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = False) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [START, ROLES[m["role"]], NL, *self.encode(m["content"]), END, NL]
        if add_generation_prompt:
            ids += [START, ASSISTANT, NL]
        return ids


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Learnable data: the assistant repeats an arithmetic progression mod 80."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, step = rng.randrange(80), rng.randrange(1, 4)
        answer = " ".join(str((a + step * i) % 80) for i in range(rng.randrange(10, 20)))
        out.append([{"role": "user", "content": f"{a} {step}"}, {"role": "assistant", "content": answer}])
    return out
