"""The `moe-lab` command line. `moe-lab info` prints what this machine supports."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from .capabilities import capabilities, format_capabilities

    info = capabilities(args.device, probe_compile=not args.no_compile_probe)
    print(json.dumps(info, indent=2, default=str) if args.json else format_capabilities(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="device, torch, grouped GEMM path per dtype, triton, torch.compile")
    info.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--no-compile-probe", action="store_true", help="skip the torch.compile check (saves seconds)")
    info.set_defaults(handler=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
