"""The checked-in generated modules must match what `make proto` produces."""

from __future__ import annotations

from pathlib import Path

from dspark import proto_codegen


def test_checked_in_code_matches_regenerated(tmp_path: Path) -> None:
    written = proto_codegen.generate(tmp_path)
    assert written, "no .proto files found"
    for path in written:
        checked_in = proto_codegen.REPO_ROOT / path.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} missing: run `make proto`"
        assert checked_in.read_bytes() == path.read_bytes(), f"{checked_in} stale: run `make proto`"


def test_generated_modules_import_and_round_trip() -> None:
    from dspark.v1 import generation_pb2, generation_pb2_grpc, worker_pb2

    req = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[1, 2, 3]),
                                         request_id="r1")
    req.sampling.temperature = 0.0
    back = generation_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("prompt") == "token_ids" and list(back.token_ids.ids) == [1, 2, 3]
    assert back.sampling.HasField("temperature") and not back.sampling.HasField("top_p")
    assert hasattr(generation_pb2_grpc, "GenerationServicer")
    spec = worker_pb2.KVSpec(protocol_version=1, model_id="m", num_layers=2)
    assert worker_pb2.KVSpec.FromString(spec.SerializeToString()) == spec
