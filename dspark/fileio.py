"""Small file helpers shared by the data stages: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

OUTPUT_MODE = 0o644  # mkstemp creates 0600; our outputs are shared data


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a whole file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename: readers see the old file or the new one,
    never a torn write; an interrupted write leaves no temp file behind."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, OUTPUT_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
