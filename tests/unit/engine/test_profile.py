"""The cached SPS(B) profile is keyed by everything that changes a step's cost."""

from __future__ import annotations

import pytest
import torch

from dspark.engine import profile


def test_profile_path_differs_by_dtype_compile_and_threads(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        keys = [(dt, c) for dt in ("float32", "bfloat16", "int8") for c in (False, True)]
        one = {key: profile.profile_path("m", *key) for key in keys}
        torch.set_num_threads(2)
        two = {key: profile.profile_path("m", *key) for key in one}
    finally:
        torch.set_num_threads(threads)
    assert len(set(one.values())) == 6  # dtype x eager/compiled
    assert not set(one.values()) & set(two.values())  # the thread count is in the machine key
    assert all(p.parent == tmp_path / "profiles" for p in one.values())
