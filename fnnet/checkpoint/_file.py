"""One safetensors file, written atomically and checked on every read: the storage half of a checkpoint.

Writing: safetensors writes the file inside a temporary folder of this writer's own,
``.<name>.<host>.<pid>.<random>.tmp`` in the target folder (safetensors' writer puts its own
``.tmpXXXXXX`` file next to the file it writes: in there too); the file is fsynced and
renamed over the target (then the folder is fsynced), so a crash leaves either the old file
or the new one, never a torn one. A writer killed mid-save leaves that one temporary folder;
the next save of any name into the folder removes every temporary of this host whose writer
process is gone (fnnet 0.2's temporary files included). A live writer's temporary, one from
another host and anything not named like one are left alone. A read-only target is refused;
a writable one keeps its permission bits.

Checking: the metadata holds a CRC-32 of every tensor's bytes (``fnnet.crc32``) and a
SHA-256 digest (``fnnet.checksum``) over every other metadata entry (the format, the structure
JSON, those CRCs) and every tensor's name, dtype and shape. Reading recomputes both, and also requires the header to be
exactly what safetensors writes (compact JSON, space padding), so any changed byte -- in the
data, the header or the metadata -- and any truncation is an error naming the file. These
are integrity checks, not authenticity: the digest is unkeyed, so whoever crafts a file can
compute it; what makes loading a crafted file safe is that nothing in it is imported or run
(see ``_codec.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import struct
import uuid
import zlib
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

FORMAT_VERSION = "3"  # 3: classes named by registered tags; 2 (fnnet 0.2): by module:qualname
READABLE_FORMATS = ("2", "3")
META_FORMAT = "fnnet.format"
META_TREE = "fnnet.tree"
META_CRC = "fnnet.crc32"
META_DIGEST = "fnnet.checksum"

_HOST = socket.gethostname().replace(".", "_") or "host"


def crc32(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def _digest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != META_DIGEST):  # every metadata entry but the digest
        h.update(key.encode() + b"\0" + str(metadata[key]).encode() + b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
    return h.hexdigest()


# -- writing --------------------------------------------------------------------------------------


def _fsync_dir(folder: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder to fsync it
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# .<name>.<host>.<pid>.<12 hex digits>.tmp: a folder now, a file in fnnet 0.2
_TEMPORARY = re.compile(r"\A\..+\.(?P<host>[^.]+)\.(?P<pid>[0-9]+)\.[0-9a-f]{12}\.tmp\Z")
_DATA = "data"  # the file inside a temporary folder
_SAFETENSORS_TEMPORARY = re.compile(r"\A\.tmp[0-9A-Za-z]{6}\Z")  # what safetensors' writer names its own


def _remove_stale_temporaries(folder: str) -> None:
    """Remove the temporaries in ``folder`` of this host's writers that are gone, whatever they were saving."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None or match["host"] != _HOST:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):  # this process's other threads, or a concurrent writer
            continue
        tmp = os.path.join(folder, name)
        try:
            if os.path.islink(tmp) or not os.path.isdir(tmp):
                os.unlink(tmp)
                continue
            inner = os.listdir(tmp)
            if all(f == _DATA or _SAFETENSORS_TEMPORARY.match(f) for f in inner):  # else not provably fnnet's
                for f in inner:
                    os.unlink(os.path.join(tmp, f))
                os.rmdir(tmp)
        except OSError:
            pass


def _check_target(path: str) -> str:
    """The folder to write in, after refusing what cannot be a checkpoint path (naming it)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"save: '{path}' is a folder; give the path of a file inside it")
    folder = os.path.dirname(os.path.abspath(path))
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"save: cannot create '{path}': '{parent}' is a file, not a folder")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"save: '{path}' exists and is read-only (mode {os.stat(path).st_mode & 0o777:o}); "
                              "make it writable or save elsewhere")
    return folder


def write(path: str, tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> None:
    """Write ``tensors`` and ``structure`` (a JSON node) to ``path`` atomically, with checksums."""
    folder = _check_target(path)  # before the checksums: a bad target fails without a pass over the data
    metadata = {
        "format": "pt",
        META_FORMAT: FORMAT_VERSION,
        META_TREE: json.dumps(structure, separators=(",", ":"), allow_nan=False),
        META_CRC: json.dumps({k: crc32(v) for k, v in tensors.items()}, separators=(",", ":")),
    }
    metadata[META_DIGEST] = _digest(metadata, tensors)
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    os.mkdir(tmp, 0o700)
    data = os.path.join(tmp, _DATA)
    try:
        # mode 0o666 & ~umask, like any new file
        os.close(os.open(data, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else os.stat(data).st_mode & 0o777
        # zero-copy: safetensors writes straight from the tensors' memory
        safetensors.torch.save_file(tensors, data, metadata=metadata)
        os.chmod(data, mode)  # safetensors writes the file anew with mode 0o600; keep the old file's mode
        with open(data, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(data, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rmdir(tmp)
    except OSError:  # left empty: the next save removes it
        pass
    _fsync_dir(folder)


# -- reading ------------------------------------------------------------------------------------


def check_exists(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at '{path}' (absolute: {os.path.abspath(path)})")
    if os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a folder; give the path of a {what} file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read '{path}': permission denied")


def _damaged(path: str, why: str) -> ValueError:
    return ValueError(f"'{path}' is corrupted or not an fnnet checkpoint: {why}")


def _check_header(path: str) -> None:
    """The header must be exactly what safetensors writes: compact JSON, then spaces up to 8 bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{os.path.getsize(path)} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8:
            raise _damaged(path, "the header length runs past the end of the file (truncated?)")
        raw = f.read(n)
    text = raw.rstrip(b" ")
    try:
        canonical = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise _damaged(path, "the header is not valid JSON") from None
    if canonical != text:
        raise _damaged(path, "the header has been altered (it is not the JSON safetensors wrote)")


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata, after every check; a plain safetensors file passes unchecked."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except PermissionError:
        raise PermissionError(f"cannot read '{path}': permission denied") from None
    except (safetensors.SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise ValueError(
            f"'{path}' ({os.path.getsize(path)} bytes) is not a readable safetensors checkpoint: it is truncated, "
            f"corrupted or another format ({type(exc).__name__}: {exc})"
        ) from None
    version = metadata.get(META_FORMAT)
    if version is None and not any(k.startswith("fnnet.") for k in metadata):
        return tensors, metadata  # a plain safetensors file (from JAX, from safetensors.torch...)
    if version not in READABLE_FORMATS:
        raise ValueError(
            f"'{path}' has fnnet checkpoint format {version!r}; this fnnet reads formats "
            f"{' and '.join(map(repr, READABLE_FORMATS))} (format 1 files from fnnet 0.1 carried no checksum over "
            "their metadata: load them with that release and save them again)"
        )
    _check_header(path)
    digest = metadata.get(META_DIGEST)
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise _damaged(path, "its checksum entry is missing or malformed")
    if _digest(metadata, tensors) != digest:
        raise _damaged(path, "the metadata (structure, checksums, tensor names, dtypes or shapes) fails its checksum")
    try:
        crcs = json.loads(metadata.get(META_CRC, ""))
    except ValueError:
        raise _damaged(path, "the per-tensor checksums are not valid JSON") from None
    if not isinstance(crcs, dict) or set(crcs) != set(tensors) or not all(type(v) is int for v in crcs.values()):
        raise _damaged(path, "the per-tensor checksums do not list every tensor once")
    bad = sorted(k for k, t in tensors.items() if crcs[k] != crc32(t))
    if bad:
        raise _damaged(path, f"the data of tensors {bad} fails its CRC-32 checksum")
    return tensors, metadata
