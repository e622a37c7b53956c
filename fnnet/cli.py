"""The ``fnnet`` command line: ``fnnet info``, ``fnnet train``, ``fnnet bench``, ``fnnet --version``.

Argument parsing imports nothing heavy (``fnnet --help`` answers without importing torch);
each command imports what it runs. Every argument is checked before any work starts, and a
bad one is a one-line usage error (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Sequence

WORKLOADS = ("matmul", "linreg", "cnn")  # fnnet.bench.WORKLOADS, spelled here to keep --help free of torch
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 14, 256  # the chapter's CNN needs 14x14; beyond 256 the digits are just blurred


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


def _device_arg(text: str) -> Any:
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


def _check_out(parser: argparse.ArgumentParser, out: str | None) -> None:
    """``--out`` must be a folder that exists and is writable, or one that can be created."""
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"argument --out: {out!r} is a file; give a folder for the checkpoint and history")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        parser.error(f"argument --out: cannot create {out!r}: {probe!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"argument --out: {probe!r} is not writable")


def _cmd_train(args: argparse.Namespace) -> int:
    parser = args.parser
    _check_out(parser, args.out)
    if args.task == "digits" and not MIN_IMAGE_SIZE <= args.size <= MAX_IMAGE_SIZE:
        parser.error(f"argument --size: {args.size} is out of range: the chapter's CNN needs images of at least "
                     f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, and above {MAX_IMAGE_SIZE} the 8x8 digits only get blurrier "
                     f"(use {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}; the chapter's MNIST size is 28)")
    if (args.resume is not None or args.every_n_steps is not None) and args.out is None:
        parser.error("--resume and --every-n-steps need --out DIR: the folder checkpoints go to and come back from")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        what = "a folder" if os.path.isdir(args.resume) else "no such file"
        print(f"fnnet train: --resume {args.resume!r}: {what}; give the path of a checkpoint file (in --out, "
              "last.safetensors or step.safetensors), or --resume auto for the newest one there", file=sys.stderr)
        return 2
    if args.task == "mnist":
        if args.data_dir is None:
            parser.error("fnnet train mnist needs --data-dir DIR holding the MNIST IDX files "
                         "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
                         "t10k-labels-idx1-ubyte[.gz]); download them from an MNIST mirror into DIR")
        if not os.path.isdir(args.data_dir):
            parser.error(f"--data-dir {args.data_dir!r} is not a folder; put the four MNIST IDX files "
                         "(train-images-idx3-ubyte[.gz] ...) there, e.g. from an MNIST mirror")
    from . import recipes
    from .device import parse_devices

    try:
        devices = parse_devices(args.device)
    except (ValueError, TypeError) as exc:
        parser.error(f"argument --device: {exc}")
    if args.task == "linreg":
        if len(devices) > 1:
            parser.error(f"argument --device: linreg trains on one device; {args.device!r} names {len(devices)}")
        recipes.train_linreg(n=args.n, epochs=args.epochs or 500, lr=args.lr if args.lr is not None else 0.1,
                             device=devices[0], out=args.out, jit=args.jit, seed=args.seed)
        return 0
    if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun: one device per process, chosen by rank
        devices = ["auto"]
    if args.task == "charlm":
        return _train_charlm(args, devices)
    common = dict(epochs=args.epochs or 10, device=devices if len(devices) > 1 else devices[0], out=args.out,
                  batch_size=args.batch_size or 128,
                  lr=args.lr if args.lr is not None else 0.01, jit=args.jit, precision=args.precision, seed=args.seed,
                  accumulate=args.accumulate, resume=args.resume, every_n_steps=args.every_n_steps)
    if args.task == "digits":
        recipes.train_digits(size=args.size, **common)
        return 0
    try:
        recipes.train_mnist(args.data_dir, **common)
    except (FileNotFoundError, ValueError) as exc:  # missing or corrupt IDX files: say which
        print(f"fnnet train mnist: {exc}", file=sys.stderr)
        return 2
    return 0


def _train_charlm(args: argparse.Namespace, devices: list) -> int:
    from . import recipes

    if args.text is not None and not os.path.isfile(args.text):
        args.parser.error(f"argument --text: no file at {args.text!r}; give a UTF-8 text file, or leave --text out "
                          "for the embedded default (the Python standard library's sources)")
    if len(devices) > 1:
        args.parser.error(f"argument --device: charlm trains on one device per process; {args.device!r} names "
                          f"{len(devices)} (use torchrun for several)")
    if args.n_embd % args.n_head:
        args.parser.error(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    recipes.train_charlm(text=args.text, steps=args.steps, out=args.out, eval_interval=args.eval_interval,
                         eval_iters=args.eval_iters, block_size=args.block_size, batch_size=args.batch_size or 12,
                         n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                         lr=args.lr if args.lr is not None else 1e-3, device=devices[0], jit=args.jit,
                         precision=args.precision, seed=args.seed, accumulate=args.accumulate, resume=args.resume,
                         every_n_steps=args.every_n_steps, max_chars=args.max_chars, sample_tokens=args.sample_tokens)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import command

    return command(args)


def _positive(kind: type) -> Any:
    """An argparse type: a positive, finite ``kind`` (int or float), with a usage error otherwise."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (0 < value < math.inf):
            raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_positive_int = _positive(int)
_positive_float = _positive(float)


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fnnet bench`` options."""
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="where to run: cpu, cuda, or all (CPU plus CUDA when present; default)")
    parser.add_argument("--scale", type=_positive_float, default=None,
                        help="problem size as a fraction of the chapter's (default 0.05; 1 = full size)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of matmul,linreg,cnn (default: all)")
    parser.add_argument("--repeats", type=_positive_int, default=3,
                        help="timed runs per variant; the median is reported (default 3)")
    parser.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--steps", type=_positive_int, default=20,
                        help="linear-regression steps per timed run (default 20)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile variants (each compiles for tens of seconds on a CPU)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE", help="also draw the ratios (needs matplotlib)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # the package's __init__ imports no torch

    parser = argparse.ArgumentParser(prog="fnnet", description="fnnet: functional training on PyTorch")
    parser.add_argument("--version", action="version", version=f"fnnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p_info = sub.add_parser("info", help="torch version, CUDA, devices and their memory, CPU threads")
    p_info.set_defaults(func=_cmd_info)

    p_train = sub.add_parser("train", help="train the chapter's models: digits (embedded data), mnist, linreg; "
                                           "charlm (a character GPT)",
                             description="Train the chapter's CNN on the embedded digits or on MNIST, or run its linear "
                                         "regression. Under torchrun (torchrun --nproc-per-node N -m fnnet train digits) "
                                         "digits and mnist train on N processes, rank 0 printing and writing. charlm "
                                         "trains a character-level GPT (nanoGPT's shakespeare_char CPU configuration) "
                                         "for --steps updates on --text or the embedded default text.")
    p_train.add_argument("task", choices=["digits", "mnist", "linreg", "charlm"], help="what to train")
    p_train.add_argument("--epochs", type=_positive_int, default=None,
                         help="epochs (default 10; linreg 500: one full-batch step per epoch, as the chapter)")
    p_train.add_argument("--device", type=_device_arg, default="auto",
                         help="auto (default), cpu, cuda, cuda:N, a GPU count (0 = CPU, -1 = all) or a list 0,1 "
                              "(several devices: data parallel)")
    p_train.add_argument("--out", default=None,
                         help="folder for the checkpoint (the best, for digits/mnist), history.csv and history.png")
    p_train.add_argument("--batch-size", type=_positive_int, default=None,
                         help="batch size (default 128; charlm 12 windows, the global batch over all ranks)")
    p_train.add_argument("--lr", type=_positive_float, default=None,
                         help="Adam learning rate (default 0.01; linreg 0.1; charlm AdamW's peak 1e-3)")
    p_train.add_argument("--accumulate", type=_positive_int, default=1, metavar="K",
                         help="digits/mnist/charlm: one optimizer update per K batches (gradient accumulation; default 1)")
    p_train.add_argument("--resume", default=None, metavar="auto|PATH",
                         help="digits/mnist/charlm: continue from a checkpoint ('auto': the newest in --out; none: start)")
    p_train.add_argument("--every-n-steps", type=_positive_int, default=None, metavar="N",
                         help="digits/mnist/charlm: also checkpoint every N optimizer steps (needs --out)")
    p_train.add_argument("--jit", action="store_true", help="compile the training step with torch.compile")
    p_train.add_argument("--precision", choices=["32", "bf16", "16-mixed"], default="32")
    p_train.add_argument("--seed", type=int, default=0, help="the key everything random derives from")
    p_train.add_argument("--size", type=_positive_int, default=28,
                         help=f"digits: image side after resizing, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (default 28)")
    p_train.add_argument("--data-dir", default=None, help="mnist: folder with the MNIST IDX files")
    p_train.add_argument("--n", type=_positive_int, default=1_000_000, help="linreg: samples (default 1,000,000)")
    charlm = p_train.add_argument_group("charlm (defaults: nanoGPT's shakespeare_char on a CPU)")
    charlm.add_argument("--text", default=None, metavar="FILE",
                        help="a UTF-8 text file (default: the Python standard library's sources, 2 MB, no download)")
    charlm.add_argument("--steps", type=_positive_int, default=2000, metavar="N", help="optimizer updates (default 2000)")
    charlm.add_argument("--eval-interval", type=_positive_int, default=250, metavar="K",
                        help="held-out loss and tokens/s every K updates (default 250)")
    charlm.add_argument("--eval-iters", type=_positive_int, default=20, help="held-out batches per check (default 20)")
    charlm.add_argument("--block-size", type=_positive_int, default=64, help="context length (default 64)")
    charlm.add_argument("--n-layer", type=_positive_int, default=4, help="transformer blocks (default 4)")
    charlm.add_argument("--n-head", type=_positive_int, default=4, help="attention heads (default 4)")
    charlm.add_argument("--n-embd", type=_positive_int, default=128, help="width (default 128)")
    charlm.add_argument("--dropout", type=float, default=0.0, help="dropout rate (default 0.0)")
    charlm.add_argument("--max-chars", type=_positive_int, default=2_000_000,
                        help="characters of text to read (default 2,000,000)")
    charlm.add_argument("--sample-tokens", type=_int_at_least(0), default=500,
                        help="characters to generate into sample.txt at the end (default 500)")
    p_train.set_defaults(func=_cmd_train, parser=p_train)

    p_bench = sub.add_parser("bench", help="time the chapter's workloads on CPU and GPU, fnnet vs plain PyTorch",
                             description="How much a GPU helps, and what fnnet costs over plain PyTorch, on this machine.")
    add_bench_arguments(p_bench)
    p_bench.set_defaults(func=_cmd_bench, parser=p_bench)

    p_ckpt = sub.add_parser("checkpoint", help="checkpoint tools: consolidate a sharded checkpoint into one file")
    ckpt_sub = p_ckpt.add_subparsers(dest="action", metavar="ACTION")
    ckpt_sub.required = True
    p_cons = ckpt_sub.add_parser("consolidate", help="a sharded checkpoint folder -> one whole safetensors file",
                                 description="Read a sharded checkpoint folder (any world size, any strategy) and "
                                             "write it as one safetensors file that fnnet.load reads.")
    p_cons.add_argument("dir", help="the sharded checkpoint folder (with its fnnet-checkpoint.json)")
    p_cons.add_argument("out", help="the safetensors file to write")
    p_cons.set_defaults(func=_cmd_consolidate)
    return parser


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from .checkpoint.sharded import consolidate

    try:
        consolidate(args.dir, args.out)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"fnnet checkpoint consolidate: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
