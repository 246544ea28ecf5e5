"""Generate a reply with the embedded engine, streaming text to the terminal.

`--prompt` is one user chat message (the model's chat template applies), as in `dspark
client --prompt`; `--raw` makes it a plain completion prompt in both."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from dspark.commands.common import add_model_arguments, add_sampling_arguments, sampling_from_args
from dspark.engine.build import build_engine
from dspark.engine.config import EngineConfig
from dspark.engine.stop import TextStream
from dspark.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="user message (with --raw: a plain completion prompt)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable); not printed")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    add_model_arguments(p, compile_default=False)  # one prompt: compiling would cost more than it saves
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserError("the prompt is empty")
    if args.raw and args.system:
        raise UserError("--system needs a chat prompt (drop --raw)")
    params = dataclasses.replace(sampling_from_args(args), stop=tuple(args.stop or ()))  # validated now
    spec = EngineConfig.from_args(args)
    target, engine, method = build_engine(spec)
    if args.raw:
        prompt_ids = target.tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        prompt_ids = target.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stream = None if args.json else TextStream(target.tokenizer, params.stop)

    def on_tokens(_seq_id: int, tokens: list[int], finished: bool) -> None:
        if stream is not None:
            sys.stdout.write(stream.push(tokens).text + (stream.flush() if finished else ""))
            sys.stdout.flush()

    compiled = target.model.compiled  # a first run compiles its token buckets while it generates
    compile_before = sum(compiled.compile_s.values()) if compiled is not None else 0.0
    t0 = time.perf_counter()
    [out] = engine.generate([prompt_ids], params, on_tokens)
    wall = time.perf_counter() - t0
    compile_s = (sum(compiled.compile_s.values()) if compiled is not None else 0.0) - compile_before
    if not args.json:
        sys.stdout.write("\n")
        speed = len(out.token_ids) / max(wall - compile_s, 1e-9)
        note = f", after {compile_s:.0f}s of one-time compilation" if compile_s >= 0.5 else ""
        print(f"[{method}] {len(out.token_ids)} tokens in {wall:.2f}s "
              f"({speed:.1f} tok/s, tau {out.mean_accepted_length:.2f}{note})", file=sys.stderr)
        return 0
    result = {
        "model": target.name,
        "method": method,
        "text": out.text if out.text is not None else target.tokenizer.decode(out.token_ids,
                                                                                skip_special_tokens=True),
        "token_ids": out.token_ids,
        "prompt_tokens": len(prompt_ids),
        "num_new_tokens": len(out.token_ids),
        "finish_reason": out.finish_reason,
        "wall_s": wall,
        "ttft_s": out.ttft_s,
        "tokens_per_s": len(out.token_ids) / wall if wall > 0 else 0.0,
        "mean_accepted_length": out.mean_accepted_length,
        "num_target_forwards": out.num_verify_steps + 1,
        "accepted_per_position": out.accepted_per_position,
        "drafted_per_position": out.drafted_per_position,
        "dtype": spec.dtype,
        "compiled": target.model.compiled is not None,
        "block_size": args.block_size if method != "ar" else 0,
        "verify_policy": args.verify_policy,
    }
    print(json.dumps(result))
    return 0
