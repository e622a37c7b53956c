"""Datasets: the embedded handwritten digits, MNIST from IDX files (downloaded once if asked), and text.

Both return ``((X_train, y_train), (X_test, y_test))`` as MNIST-like tensors: images
``float32`` of shape ``(N, 1, H, W)`` and labels ``int64``. The loaders that batch them live in
:mod:`fnnet.data`. :func:`load_text` gives character ids and a vocabulary for a language model
(the default text is the Python standard library's sources: no download), batched into random
windows by :class:`fnnet.data.WindowLoader`.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import shutil
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any, NamedTuple


import numpy as np
import torch

__all__ = ["load_digits", "load_mnist", "load_text", "stdlib_text", "CharVocab", "Text", "DEFAULT_MIRROR",
           "DIGITS_TRAIN_SIZE", "DEFAULT_TEXT_CHARS"]


# --------------------------------------------------------------------------------------
# Digits (embedded, no network)
# --------------------------------------------------------------------------------------
DIGITS_TRAIN_SIZE = 1500


def load_digits(size: int = 28) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), as MNIST-like tensors.

    The images are scaled from [0, 16] to [0, 1] and resized to ``size`` x ``size`` with
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (no resize when
    ``size == 8``; values are clamped to [0, 1]). The split is fixed: the first 1,500 images in
    scikit-learn's order are the training set, the last 297 the test set. That order groups
    images by writer, so the test set is (mostly) writers the model has not seen.

    Returns:
        ``(X_train, y_train), (X_test, y_test)``: float32 ``N x 1 x size x size`` and int64 ``N``.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise ImportError(
            "fnnet.data.load_digits reads the digits that ship with scikit-learn; install it with "
            "`pip install scikit-learn` (no network is needed after that)"
        ) from None
    digits = _sk_load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(int(size), int(size)), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)
    y = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    x = x.contiguous()
    t = DIGITS_TRAIN_SIZE
    return (x[:t].clone(), y[:t].clone()), (x[t:].clone(), y[t:].clone())


# --------------------------------------------------------------------------------------
# MNIST from IDX files
# --------------------------------------------------------------------------------------
DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def _mnist_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _candidates(root: Path, name: str) -> list[Path]:
    # root itself, then torchvision's layout (root/MNIST/raw), each raw then gzipped
    return [folder / f for folder in (root, root / "MNIST" / "raw") for f in (name, name + ".gz")]


def _read_idx(path: Path, magic: int, *, gz: bool | None = None, shown: Path | None = None) -> tuple[tuple[int, ...], bytes, int]:
    """``(dims, data, header_size)`` of an IDX file of unsigned bytes, validated."""
    shown = shown or path
    gz = path.name.endswith(".gz") if gz is None else gz
    if gz:
        try:
            with gzip.open(path, "rb") as f:
                data = f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise ValueError(f"{shown}: not a valid gzip file ({exc}); delete it and download it again") from None
    else:
        data = path.read_bytes()  # an OSError (permissions, ...) passes through as it is
    ndim = magic & 0xFF
    kind = "images" if magic == _IMAGES_MAGIC else "labels"
    if len(data) < 4:
        raise ValueError(f"{shown}: {len(data)} bytes, too short for an IDX header (expected an IDX {kind} file)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        hint = " It looks gzip-compressed: name it with a .gz suffix." if data[:2] == b"\x1f\x8b" else ""
        raise ValueError(
            f"{shown}: magic number {found} (0x{found:08x}), expected {magic} (0x{magic:08x}, an IDX "
            f"{kind} file of unsigned bytes with {ndim} dimension(s)).{hint}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{shown}: {len(data)} bytes, truncated inside the {header}-byte IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{shown}: {len(data)} bytes{' after gunzip' if gz else ''}, expected {expected} "
            f"({header}-byte header + {' x '.join(map(str, dims))} values): the file is {what}"
        )
    return dims, data, header


def _fetch(url: str, dest: Path, magic: int, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically, checking it is a gzipped IDX file before the rename."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
                f.flush()
                os.fsync(f.fileno())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"could not download {url} ({reason})") from None
        _read_idx(tmp, magic, gz=True, shown=Path(url))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def load_mnist(
    root: str | os.PathLike[str],
    train: bool = True,
    *,
    download: bool = False,
    mirror: str = DEFAULT_MIRROR,
    timeout: float = 60.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training (``train=True``, 60,000) or test (10,000) images from the standard IDX files.

    Looks in ``root`` and in ``root/MNIST/raw`` (torchvision's layout) for
    ``{train,t10k}-images-idx3-ubyte`` and ``{train,t10k}-labels-idx1-ubyte``, each raw or
    ``.gz``. Both files are validated: magic numbers (2051 images, 2049 labels), file sizes
    against the dimensions in their headers, and equal image and label counts.
    With ``download=True`` missing files are fetched as ``<mirror><name>.gz`` into ``root``
    (written atomically and validated before they are renamed into place). Any format that
    ``urllib`` opens works as a mirror, ``file://`` included.

    Returns:
        ``(X, y)``: float32 ``N x 1 x 28 x 28`` (``N x 1 x rows x cols`` as the header says) in
        [0, 1] (the bytes divided by 255) and int64 ``N``.

    Raises:
        FileNotFoundError: a file is missing, naming every path searched and where to get it.
        ValueError: a corrupt or truncated file, or a label outside 0-9, naming the file with the
            expected and found values.
        ConnectionError: ``download=True`` and the mirror cannot be reached.
    """
    root = Path(root)
    names = _mnist_names(train)
    magics = (_IMAGES_MAGIC, _LABELS_MAGIC)
    found: list[Path] = []
    for name, magic in zip(names, magics):
        hit = next((p for p in _candidates(root, name) if p.is_file()), None)
        if hit is None and download:
            root.mkdir(parents=True, exist_ok=True)
            hit = root / (name + ".gz")
            try:
                _fetch(mirror + name + ".gz", hit, magic, timeout)
            except ConnectionError as exc:
                raise ConnectionError(
                    f"{exc}. Without a network, download {name}.gz for both files of the "
                    f"{'training' if train else 'test'} set from {mirror} (or another MNIST mirror) on "
                    f"another machine and copy them into {root}"
                ) from None
        if hit is None:
            searched = ", ".join(str(p) for p in _candidates(root, name))
            raise FileNotFoundError(
                f"MNIST file {name} not found; searched {searched}. Download {name}.gz from {mirror} into "
                f"{root}, or call load_mnist(root, train={train}, download=True)"
            )
        found.append(hit)
    (n, rows, cols), images, img_header = _read_idx(found[0], _IMAGES_MAGIC)
    (n_labels,), labels, lab_header = _read_idx(found[1], _LABELS_MAGIC)
    if n != n_labels:
        raise ValueError(f"{found[0]} holds {n} images but {found[1]} holds {n_labels} labels; they must agree")
    x = np.frombuffer(images, dtype=np.uint8, offset=img_header).reshape(n, 1, rows, cols)
    y = np.frombuffer(labels, dtype=np.uint8, offset=lab_header)
    if n and int(y.max()) > 9:
        bad = int(np.argmax(y > 9))
        raise ValueError(f"{found[1]}: label {int(y[bad])} at index {bad} is not a digit; MNIST labels are 0-9 "
                         "(the file is corrupted, or it is not an MNIST labels file)")
    return torch.from_numpy(x.astype(np.float32) / np.float32(255.0)), torch.from_numpy(y.astype(np.int64))



# --------------------------------------------------------------------------------------
# Text (a character vocabulary; the default text needs no download)
# --------------------------------------------------------------------------------------
DEFAULT_TEXT_CHARS = 2_000_000


class CharVocab:
    """A character tokenizer: every distinct character of a text, sorted, gets an id (nanoGPT's ``shakespeare_char``).

    ``encode(text) -> int64 tensor`` and ``decode(ids) -> str``; ``chars`` is the sorted alphabet
    and ``len(vocab)`` its size (a GPT's ``vocab_size``). A character outside the alphabet is a
    ``ValueError`` naming it.
    """

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """The ids of ``text``'s characters, an int64 tensor of ``len(text)``."""
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.int64)
        except KeyError as err:
            raise ValueError(f"CharVocab.encode: the character {err.args[0]!r} is not in the vocabulary "
                             f"({len(self.chars)} characters)") from None

    def decode(self, ids: Any) -> str:
        """The text of ``ids`` (a tensor or a sequence of ints in ``[0, len(vocab))``)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        try:
            return "".join(self.chars[i] for i in values)
        except (IndexError, TypeError):
            raise ValueError(f"CharVocab.decode: ids must be ints in [0, {len(self.chars)}), got "
                             f"{[v for v in values if not (isinstance(v, int) and 0 <= v < len(self.chars))][:5]}") from None

    def __repr__(self) -> str:
        return f"CharVocab({len(self.chars)} characters)"


class Text(NamedTuple):
    """What :func:`load_text` returns: ``train`` and ``val`` int64 ids (1-D) and the ``vocab``."""

    train: torch.Tensor
    val: torch.Tensor
    vocab: CharVocab


def stdlib_text(max_chars: int = DEFAULT_TEXT_CHARS) -> str:
    """The default corpus: the Python standard library's own ``.py`` sources, no download.

    The files under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` left out) in sorted
    order of their relative paths, each read as UTF-8 (files that are not are skipped) and joined
    with a newline, cut at ``max_chars`` characters. The text depends on the interpreter's
    version (this is Python's code, so another Python gives other text), never on the machine.
    """
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
    parts, size = [], 0
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text) + 1
        if size >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


def load_text(path: str | os.PathLike | None = None, *, max_chars: int = DEFAULT_TEXT_CHARS,
              val_fraction: float = 0.1) -> Text:
    """A text as character ids for a language model: ``train, val, vocab = load_text()``.

    Args:
        path: a UTF-8 text file (Shakespeare's ``input.txt``, say). ``None``: the embedded
            default, :func:`stdlib_text` (the running Python's standard library sources, the
            first ``max_chars`` characters in a fixed order; no download).
        max_chars: read at most this many characters (default 2,000,000).
        val_fraction: the last fraction of the text is the validation split (nanoGPT: 0.1).

    Returns:
        :class:`Text`: ``train`` (the first 90%) and ``val`` (the last 10%) as int64 ids, and the
        :class:`CharVocab` of the whole text.

    Raises:
        FileNotFoundError / ValueError: a missing or non-UTF-8 file (named), a text too short to
            split, a ``val_fraction`` outside (0, 1).
    """
    if not (isinstance(val_fraction, float) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"load_text: val_fraction must be a float in (0, 1), got {val_fraction!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 2:
        raise ValueError(f"load_text: max_chars must be an int >= 2, got {max_chars!r}")
    if path is None:
        text = stdlib_text(max_chars)
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_text: no file at '{os.fspath(path)}'")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(max_chars)
        except UnicodeDecodeError as err:
            raise ValueError(f"load_text: '{os.fspath(path)}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    cut = int(len(text) * (1.0 - val_fraction))
    if cut < 2 or len(text) - cut < 2:
        raise ValueError(f"load_text: {len(text)} characters are too few to split into train and validation text")
    vocab = CharVocab(text)
    ids = vocab.encode(text)
    return Text(ids[:cut].clone(), ids[cut:].clone(), vocab)
