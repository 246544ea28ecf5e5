"""A third-party gRPC client built from `proto/` alone (stubs generated with grpcio-tools
into a temporary directory, run in a fresh interpreter that never imports dspark) uses
every sampling feature the OpenAI front has: stop strings, logprobs, penalties and logit
bias, plus ListModels, option validation and Resume."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fleet.conftest import PROMPTS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]

CLIENT = textwrap.dedent('''
    import json, sys
    import grpc
    sys.path.insert(0, sys.argv[1])
    import generation_pb2 as pb, generation_pb2_grpc as pb_grpc

    stub = pb_grpc.GenerationStub(grpc.insecure_channel(sys.argv[2]))
    out = {}
    models = stub.ListModels(pb.ListModelsRequest(), timeout=60).models
    out["models"] = [[m.id, list(m.methods)] for m in models]

    def run(req):
        msgs = list(stub.Generate(req, timeout=300))
        return {"text": "".join(m.text for m in msgs), "ids": [t for m in msgs for t in m.token_ids],
                "reason": pb.FinishReason.Name(msgs[-1].finish_reason), "id": msgs[-1].request_id,
                "logprobs": [[lp.token_id, lp.logprob, len(lp.top_logprobs)] for m in msgs for lp in m.logprobs]}

    greedy = pb.SamplingOptions(temperature=0, max_new_tokens=24)
    out["plain"] = run(pb.GenerateRequest(text=sys.argv[3], sampling=greedy))
    stop = out["plain"]["text"][10:13]
    out["stop_string"] = stop
    out["stopped"] = run(pb.GenerateRequest(text=sys.argv[3], sampling=greedy, stop=pb.StopOptions(stop=[stop])))
    s = pb.SamplingOptions(temperature=0, max_new_tokens=8, logprobs=2, frequency_penalty=1.0,
                           logit_bias={out["plain"]["ids"][0]: -100.0})
    out["processed"] = run(pb.GenerateRequest(text=sys.argv[3], sampling=s))
    chat = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi")]),
                              sampling=pb.SamplingOptions(temperature=0, max_new_tokens=64))
    out["chat"] = run(chat)
    resumed = list(stub.Resume(pb.ResumeRequest(request_id=out["chat"]["id"], offset=0), timeout=60))
    out["resumed_text"] = "".join(m.text for m in resumed)
    out["errors"] = {}
    for name, spec in [("block_size", pb.SpeculationOptions(block_size=100)),
                       ("verify_policy", pb.SpeculationOptions(verify_policy="bogus")),
                       ("method", pb.SpeculationOptions(method="ar"))]:
        try:
            list(stub.Generate(pb.GenerateRequest(text="hi", speculation=spec), timeout=60))
            out["errors"][name] = "OK"
        except grpc.RpcError as e:
            out["errors"][name] = [e.code().name, e.details()]
    print(json.dumps(out))
''')


def test_client_generated_from_proto_only(fleet: Any, reference: dict[str, list[int]], tmp_path: Path) -> None:
    from grpc_tools import protoc

    proto_dir = REPO / "proto/dspark/v1"
    assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        str(proto_dir / "generation.proto")]) == 0
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    result = subprocess.run([sys.executable, "-I", str(script), str(tmp_path), f"127.0.0.1:{fleet.ports['grpc']}",
                             PROMPTS[0]], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)

    assert out["models"] == [[fleet.cfg.model, [fleet.cfg.method]]]
    plain, stopped, stop = out["plain"], out["stopped"], out["stop_string"]
    assert plain["ids"] == reference[PROMPTS[0]]
    assert stopped["text"] == plain["text"][: plain["text"].find(stop)] and stopped["reason"] == "FINISH_REASON_STOP"
    assert stopped["ids"] == plain["ids"][: len(stopped["ids"])] and len(stopped["ids"]) < len(plain["ids"])
    processed = out["processed"]
    assert len(processed["logprobs"]) == len(processed["ids"]) and all(n == 2 for _, _, n in processed["logprobs"])
    assert processed["ids"][0] != plain["ids"][0]  # the -100 bias banned the greedy first token
    assert out["resumed_text"] == out["chat"]["text"] and "<|im_end|>" not in out["resumed_text"]
    for name in ("block_size", "verify_policy", "method"):
        code, details = out["errors"][name]
        assert code == "INVALID_ARGUMENT" and name in details
