"""Regenerate chat responses with the target (training data for the drafter)."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from dspark.engine.build import DTYPES, default_device
from dspark.models.registry import DEFAULT_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="chat JSONL with `messages` (dspark data prepare)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="output JSONL (appended; finished ids are skipped)")
    p.add_argument("--limit", type=int, default=None, help="first N conversations")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts")
    p.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-prompt", default=None,
                   help="fixed system prompt (default: none, so the chat template inserts the model's own, "
                        "as for every other command)")


def run(args: argparse.Namespace) -> int:
    from dspark.models.loader import load_model
    from dspark.train.regenerate import read_conversations, regenerate

    records = read_conversations(args.data, args.limit)
    loaded = load_model(args.model, DTYPES[args.dtype], args.device or default_device())
    skipped = [0]

    def plan(todo: int, too_long: int) -> None:
        bar.total, skipped[0] = todo, too_long
        bar.refresh()

    with tqdm(total=None, desc="regenerate", unit="conv", file=sys.stderr) as bar:
        n = regenerate(loaded, records, args.out, args.max_new_tokens, args.batch, args.max_prompt_tokens,
                       args.seed, args.system_prompt, on_done=lambda _: bar.update(1),
                       on_plan=plan)
    print(f"dspark: wrote {n} conversations to {args.out}; left out {skipped[0]} prompts longer than "
          f"--max-prompt-tokens {args.max_prompt_tokens}", file=sys.stderr)
    return 0
