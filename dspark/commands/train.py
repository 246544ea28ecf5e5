"""Train a DSpark (or DFlash-style) drafter on regenerated data, target features captured online."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training YAML (see dspark/train/config.py)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the run dir")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps")


def run(args: argparse.Namespace) -> int:
    import torch

    from dspark.models.loader import load_model
    from dspark.train.config import TrainConfig
    from dspark.train.examples import load_examples
    from dspark.train.trainer import DTYPES, Trainer

    cfg = TrainConfig.load(args.config)
    if args.max_steps:
        cfg = cfg.model_copy(update={"max_steps": args.max_steps})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.model, DTYPES[cfg.target_dtype], cfg.device)
    data = [cfg.data] if isinstance(cfg.data, str) else cfg.data
    examples = load_examples(data, loaded.tokenizer, cfg.max_len)
    heldout = None
    if cfg.heldout_data:
        heldout = load_examples([cfg.heldout_data], loaded.tokenizer, cfg.max_len, limit=cfg.heldout)
    trainer = Trainer(cfg, loaded.model, examples, heldout)
    if not args.no_resume and trainer.resume():
        print(f"dspark: resumed at step {trainer.step}/{trainer.total_steps}", file=sys.stderr)
    print(f"dspark: {len(trainer.examples)} examples ({len(trainer.heldout)} held out), {trainer.total_steps} steps, "
          f"{sum(p.numel() for p in trainer.drafter.parameters()) / 1e6:.2f}M drafter parameters, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    trainer.train()
    out = trainer.export()
    if cfg.export:
        trainer.export(Path(cfg.export))
    print(f"dspark: drafter written to {out}" + (f" and {cfg.export}" if cfg.export else ""), file=sys.stderr)
    return 0
