"""The ``fnnet`` command line: ``fnnet info``, ``fnnet train``, ``fnnet bench``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from .device import device_info

    info = device_info()
    print(f"torch           {info['torch']}")
    print(f"cuda available  {info['cuda_available']}" + (f" (CUDA {info['cuda_version']})" if info["cuda_version"] else ""))
    print(f"device count    {info['device_count']}")
    for d in info["devices"]:
        gib = d["total_memory_bytes"] / 2**30
        print(f"  cuda:{d['index']}  {d['name']}  {gib:.1f} GiB  sm_{d['capability'].replace('.', '')}  {d['multiprocessors']} SMs")
    print(f"default device  {info['default_device']}")
    print(f"cpu threads     {info['cpu_threads']} (of {info['cpu_count']} cores)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fnnet", description="fnnet: functional training on PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p_info = sub.add_parser("info", help="torch version, CUDA, devices and their memory, CPU threads")
    p_info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
