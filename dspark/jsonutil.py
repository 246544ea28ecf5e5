"""Strict JSON for everything we print or write: NaN/inf become null (json.dumps would
otherwise emit the non-standard `NaN`, which strict parsers reject)."""

from __future__ import annotations

import json
import math
from typing import Any


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(_clean(obj), allow_nan=False, **kwargs)
