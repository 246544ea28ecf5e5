"""The fuzz harness against the fake fleet (real validation, keys and guards; no model).
The fleet's own tests point the same functions at the real router."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from services.security.admission import Admission
from services.security.auth import ApiKeyAuth, add_key
from tests.integration.fuzz.fake_fleet import FakeFleet
from tests.integration.fuzz.harness import fuzz_grpc, fuzz_http

pytestmark = pytest.mark.integration
N = 150


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeFleet, str]]:
    path = tmp_path_factory.mktemp("keys") / "keys"
    key = add_key(path, "fuzz")
    with FakeFleet(Admission(auth=ApiKeyAuth.from_file(path))) as f:
        yield f, key


def test_fuzz_grpc_authenticated(fleet: tuple[FakeFleet, str]) -> None:
    f, key = fleet
    seen = fuzz_grpc(lambda: grpc.insecure_channel(f"127.0.0.1:{f.grpc_port}"), n=N,
                     metadata=(("authorization", f"Bearer {key}"),))
    assert seen.get("INVALID_ARGUMENT", 0) > 0 and seen.get("OK", 0) > 0, seen
    assert f.state.used_slots == 0  # cancelled streams freed their slots


def test_fuzz_grpc_without_key(fleet: tuple[FakeFleet, str]) -> None:
    f, _ = fleet
    seen = fuzz_grpc(lambda: grpc.insecure_channel(f"127.0.0.1:{f.grpc_port}"), n=30)
    assert set(seen) == {"UNAUTHENTICATED"}, seen


def test_fuzz_http(fleet: tuple[FakeFleet, str]) -> None:
    f, key = fleet
    seen = fuzz_http(f"http://127.0.0.1:{f.http_port}", n=N, headers={"Authorization": f"Bearer {key}"})
    assert seen.get(400, 0) > 0 and seen.get(200, 0) > 0, seen


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # the 2 MiB body in the report
def test_harness_catches_undocumented_codes(fleet: tuple[FakeFleet, str]) -> None:
    # Without a key everything is 401; declaring 401 undocumented must fail the run.
    f, _ = fleet
    with pytest.raises(AssertionError, match="undocumented"):
        fuzz_http(f"http://127.0.0.1:{f.http_port}", n=5, documented=frozenset({200, 400}))
