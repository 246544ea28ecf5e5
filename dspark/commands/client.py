"""Stream one generation from a running fleet over gRPC.

`--prompt` is sent as one user chat message (the model's chat template applies), exactly as
`dspark generate --prompt` does; `--raw` sends it as a plain completion prompt in both.

`--api-key` (or env DSPARK_API_KEY) is sent as metadata `authorization: Bearer <key>`;
`--ca-file` (or `--tls`, trusting the system roots) connects over TLS."""

from __future__ import annotations

import argparse
import json
import os
import sys

from dspark.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="router HOST:PORT")
    p.add_argument("--prompt", required=True, help="user message (with --raw: a plain completion prompt)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, nothing streamed")
    p.add_argument("--api-key", default=None, help="API key (default: env DSPARK_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect over TLS (system CA roots)")
    p.add_argument("--ca-file", default=None, help="connect over TLS trusting this PEM CA")


def open_channel(args: argparse.Namespace):  # -> grpc.Channel
    import grpc

    if args.tls or args.ca_file:
        from services.security.tls import grpc_channel_credentials

        return grpc.secure_channel(args.target, grpc_channel_credentials(args.ca_file))
    return grpc.insecure_channel(args.target)


def auth_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...] | None:
    key = args.api_key or os.environ.get("DSPARK_API_KEY")
    return (("authorization", f"Bearer {key}"),) if key else None


def build_request(args: argparse.Namespace):  # -> generation_pb2.GenerateRequest
    from dspark.v1 import generation_pb2 as pb

    sampling = pb.SamplingOptions(temperature=args.temperature)
    for name in ("max_new_tokens", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    stop = pb.StopOptions(stop=args.stop or [])
    if args.raw:
        if args.system:
            raise UserError("--system needs a chat prompt (drop --raw)")
        return pb.GenerateRequest(text=args.prompt, sampling=sampling, stop=stop)
    msgs = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
    msgs.append(pb.ChatMessage(role="user", content=args.prompt))
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=msgs), sampling=sampling, stop=stop)


def run(args: argparse.Namespace) -> int:
    import grpc

    from dspark.v1 import generation_pb2 as pb
    from dspark.v1 import generation_pb2_grpc as pb_grpc

    text, ids, last = [], [], None
    with open_channel(args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            for msg in stub.Generate(build_request(args), timeout=args.timeout, metadata=auth_metadata(args)):
                if msg.offset != len(ids):
                    raise UserError(f"stream gap or duplicate at offset {msg.offset} (have {len(ids)})")
                ids += msg.token_ids
                text.append(msg.text)
                last = msg
                if not args.json:
                    print(msg.text, end="", flush=True)
        except grpc.RpcError as e:
            raise UserError(f"{e.code().name}: {e.details()}") from None
    usage = last.usage if last is not None else pb.Usage()
    if args.json:
        print(json.dumps({
            "request_id": last.request_id if last else "", "text": "".join(text), "token_ids": ids,
            "finish_reason": pb.FinishReason.Name(last.finish_reason) if last else "",
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "num_target_forwards": usage.num_target_forwards,
            "mean_accepted_length": round(usage.mean_accepted_length, 4)}))
    else:
        print(file=sys.stdout)
        print(f"[{usage.completion_tokens} tokens, mean accepted length {usage.mean_accepted_length:.2f}]",
              file=sys.stderr)
    return 0
