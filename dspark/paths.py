"""Where DSpark keeps things on disk. Every default location is decided here, from the
environment or the repository layout, never from a hard-coded machine path."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DSPARK_CACHE"
EVAL_DIR_ENV = "DSPARK_EVAL_DIR"


def cache_dir() -> Path:
    """Root of generated artefacts: `$DSPARK_CACHE`, else `~/.cache/dspark`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dspark"


def repo_root() -> Path:
    """The checkout holding the `dspark` package (meaningful for editable/in-tree use)."""
    return Path(__file__).resolve().parent.parent


def eval_dir() -> Path:
    """Evaluation prompts: `$DSPARK_EVAL_DIR`, else the sets shipped as package data in
    `dspark/bench/eval/` (see its README for provenance and licence)."""
    env = os.environ.get(EVAL_DIR_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "bench" / "eval"
