"""Train a DSpark (or DFlash-style) drafter on a target cache (config: YAML)."""

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
    from dspark.train.target_cache import open_target_cache
    from dspark.train.trainer import DTYPES, Trainer

    cfg = TrainConfig.load(args.config)
    if args.max_steps:
        cfg = cfg.model_copy(update={"max_steps": args.max_steps})
    loaded = load_model(cfg.model, DTYPES[cfg.dtype], cfg.device)
    cache = open_target_cache(cfg.data, cfg.model)
    trainer = Trainer(cfg, loaded.model, cache)
    if not args.no_resume and trainer.resume():
        print(f"dspark: resumed at step {trainer.step}/{trainer.total_steps}", file=sys.stderr)
    print(f"dspark: {len(trainer.seqs)} sequences, {trainer.total_steps} steps, "
          f"{sum(p.numel() for p in trainer.drafter.parameters()) / 1e6:.2f}M drafter parameters, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    trainer.train()
    out = trainer.export()
    if cfg.export:
        trainer.export(Path(cfg.export))
    print(f"dspark: drafter written to {out}" + (f" and {cfg.export}" if cfg.export else ""), file=sys.stderr)
    return 0
