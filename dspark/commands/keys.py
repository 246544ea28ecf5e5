"""Manage the fleet's API key file (`dspark serve --api-key-file FILE`).

`dspark keys add --file F --name N` appends `N:sha256$<hash>` to F (created with mode 0600)
and prints the new key once on stdout; only its hash is stored, so it cannot be shown again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_action", required=True)
    add = sub.add_parser("add", help="create a key, store its hash, print it once")
    add.add_argument("--file", required=True, type=Path, help="API key file (created if missing)")
    add.add_argument("--name", required=True, help="key name (shown in logs and rate limits)")
    add.add_argument("--json", action="store_true", help='print {"name": ..., "key": ...}')
    ls = sub.add_parser("list", help="names of the keys in a file")
    ls.add_argument("--file", required=True, type=Path)


def run(args: argparse.Namespace) -> int:
    from services.security.auth import ApiKeyAuth, add_key

    if args.keys_action == "list":
        for name in ApiKeyAuth.from_file(args.file).names:
            print(name)
        return 0
    key = add_key(args.file, args.name)
    if args.json:
        print(json.dumps({"name": args.name, "key": key}))
    else:
        print(key)
        print(f"added key {args.name!r} to {args.file}; store it now, it is not shown again", file=sys.stderr)
    return 0
