"""Run the target over regenerated conversations and store the drafter's training cache."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from dspark.commands.common import DEFAULT_MODEL, DTYPES, default_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="regenerated chat JSONL (dspark data regenerate)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="cache directory (rerun to resume)")
    p.add_argument("--max-len", type=int, default=1024, help="truncate conversations to this many tokens")
    p.add_argument("--shard-size", type=int, default=256, help="conversations per shard")
    p.add_argument("--taps", default=None, help="comma-separated target layers (default: evenly spaced)")
    p.add_argument("--limit", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from dspark.drafter.config import default_taps
    from dspark.errors import UserError
    from dspark.models.loader import load_model
    from dspark.train.regenerate import read_conversations
    from dspark.train.target_cache import build_target_cache, file_fingerprint

    loaded = load_model(args.model, DTYPES[args.dtype], args.device or default_device())
    taps = [int(t) for t in args.taps.split(",")] if args.taps else default_taps(loaded.config.num_layers)
    if max(taps) >= loaded.config.num_layers - 1:
        raise UserError(f"taps {taps}: the last layer is never tapped")
    convs = [r["messages"] for r in read_conversations(args.data, args.limit)]
    with tqdm(total=len(convs), desc="cache", unit="conv", file=sys.stderr) as bar:
        m = build_target_cache(loaded.model, loaded.tokenizer, args.model, convs, args.out, taps,
                               args.max_len, args.shard_size, source=file_fingerprint(args.data),
                               on_sequence=lambda n: bar.update(1))
    print(f"dspark: cache {args.out}: {m['num_sequences']} sequences, {m['num_tokens']} tokens, taps {taps}",
          file=sys.stderr)
    return 0
