"""The `dspark` command. Each subcommand lives in `dspark/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from dspark.errors import UserError

# subcommand -> module; nested groups (`dspark data prepare`) use a dict.
COMMANDS: dict[str, str | dict[str, str]] = {
    "generate": "dspark.commands.generate",
    "bench": "dspark.commands.bench",
    "data": {
        "prepare": "dspark.commands.data_prepare",
        "regenerate": "dspark.commands.data_regenerate",
    },
    "train": "dspark.commands.train",
    "calibrate": "dspark.commands.calibrate",
    "eval-drafter": "dspark.commands.eval_drafter",
    "profile": "dspark.commands.profile",
    "serve": "dspark.commands.serve",
    "client": "dspark.commands.client",
    "loadtest": "dspark.commands.loadtest",
    "keys": "dspark.commands.keys",
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dspark", description="DSpark speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, target in COMMANDS.items():
        if isinstance(target, dict):
            group = sub.add_parser(name, help=f"{name} subcommands")
            gsub = group.add_subparsers(dest="subcommand", required=True)
            for child, module in target.items():
                _add(gsub, child, module)
        else:
            _add(sub, name, target)
    return parser


def _add(sub: argparse._SubParsersAction, name: str, module: str) -> None:
    if not _available(module):
        return
    mod = importlib.import_module(module)
    p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"dspark: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
