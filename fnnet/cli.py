"""The ``fnnet`` command line: ``fnnet info``, ``fnnet train``, ``fnnet bench``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence


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


def _device_arg(text: str):
    """``--device`` takes what ``Trainer(devices=...)`` takes: auto, cpu, cuda, cuda:N, N, or 0,1."""
    if "," in text:
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid device list {text!r}: use GPU indices like 0,1") from None
    try:
        return int(text)
    except ValueError:
        return text


def _cmd_train(args: argparse.Namespace) -> int:
    from . import recipes
    from .trainer import parse_devices

    try:
        devices = parse_devices(args.device)
    except (ValueError, TypeError) as exc:
        args.parser.error(f"argument --device: {exc}")
    if len(devices) > 1:
        args.parser.error(f"argument --device: {args.device!r} names {len(devices)} devices; "
                          "multi-device data parallelism is not in this release (use one device)")
    if args.task == "linreg":
        recipes.train_linreg(n=args.n, steps=args.steps, lr=args.lr if args.lr is not None else 0.1,
                             device=devices[0], jit=args.jit, seed=args.seed)
        return 0
    common = dict(epochs=args.epochs, device=devices[0], out=args.out, batch_size=args.batch_size,
                  lr=args.lr if args.lr is not None else 0.01, jit=args.jit, precision=args.precision, seed=args.seed)
    if args.task == "digits":
        recipes.train_digits(size=args.size, **common)
    else:
        if args.data_dir is None:
            args.parser.error("fnnet train mnist needs --data-dir DIR holding the MNIST IDX files "
                              "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
                              "t10k-labels-idx1-ubyte[.gz]); download them from an MNIST mirror into DIR")
        if not os.path.isdir(args.data_dir):
            args.parser.error(f"--data-dir {args.data_dir!r} is not a folder; put the four MNIST IDX files "
                              "(train-images-idx3-ubyte[.gz] ...) there, e.g. from an MNIST mirror")
        try:
            recipes.train_mnist(args.data_dir, **common)
        except (FileNotFoundError, ValueError) as exc:  # missing or corrupt IDX files: say which
            print(f"fnnet train mnist: {exc}", file=sys.stderr)
            return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fnnet", description="fnnet: functional training on PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p_info = sub.add_parser("info", help="torch version, CUDA, devices and their memory, CPU threads")
    p_info.set_defaults(func=_cmd_info)

    p_train = sub.add_parser("train", help="train the chapter's models: digits (embedded data), mnist, linreg",
                             description="Train the chapter's CNN on the embedded digits or on MNIST, or run its linear regression.")
    p_train.add_argument("task", choices=["digits", "mnist", "linreg"], help="what to train")
    p_train.add_argument("--epochs", type=_positive_int, default=10, help="epochs (digits, mnist; default 10)")
    p_train.add_argument("--device", type=_device_arg, default="auto",
                         help="auto (default), cpu, cuda, cuda:N, a GPU count (0 = CPU, -1 = all) or a list 0,1")
    p_train.add_argument("--out", default=None, help="folder for the best checkpoint, history.csv and history.png")
    p_train.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    p_train.add_argument("--lr", type=_positive_float, default=None, help="Adam learning rate (default 0.01; linreg 0.1)")
    p_train.add_argument("--jit", action="store_true", help="compile the training step with torch.compile")
    p_train.add_argument("--precision", choices=["32", "bf16", "16-mixed"], default="32")
    p_train.add_argument("--seed", type=int, default=0, help="the key everything random derives from")
    p_train.add_argument("--size", type=_positive_int, default=28, help="digits: image side after resizing (default 28)")
    p_train.add_argument("--data-dir", default=None, help="mnist: folder with the MNIST IDX files")
    p_train.add_argument("--n", type=_positive_int, default=1_000_000, help="linreg: samples (default 1,000,000)")
    p_train.add_argument("--steps", type=_positive_int, default=500, help="linreg: full-batch steps (default 500)")
    p_train.set_defaults(func=_cmd_train, parser=p_train)

    try:
        from .bench import register as _register_bench
    except ImportError:  # pragma: no cover
        _register_bench = None
    if _register_bench is not None:
        _register_bench(sub)
    return parser


def _positive(kind: type) -> Any:
    """An argparse type: a positive, finite ``kind`` (int or float), with a usage error otherwise."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (0 < value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_positive_int = _positive(int)
_positive_float = _positive(float)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
