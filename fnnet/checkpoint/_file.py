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

import collections
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
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


_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # full disk, quota, file size limit


def _storage_error(exc: BaseException) -> int | None:
    """The errno of a write that ran out of room (an ``OSError``, or safetensors' error quoting "os error N")."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRORS:
        return exc.errno
    match = re.search(r"os error (\d+)", str(exc)) if isinstance(exc, safetensors.SafetensorError) else None
    return int(match[1]) if match and int(match[1]) in _STORAGE_ERRORS else None


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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _storage_error(exc)
        if full is not None:
            kept = ("the file already there is kept as it was" if os.path.exists(path)
                    else "nothing was written at that path")
            raise OSError(full, f"save: could not write '{path}' ({os.strerror(full)}, while writing "
                                f"{sum(t.nbytes for t in tensors.values())} bytes of tensors into '{folder}'); the "
                                f"partial temporary was removed and {kept}. Free space on that file system or save "
                                "elsewhere") from None
        raise
    try:
        os.rmdir(tmp)
    except OSError:  # left empty: the next save removes it
        pass
    _fsync_dir(folder)


# -- reading ------------------------------------------------------------------------------------


def check_exists(path: str, what: str) -> None:
    """Refuse, naming ``path``, what cannot be read as a file: nothing there, a broken symbolic link, a folder,
    anything but a regular file (a FIFO would block the reader forever, a device would never end), no
    permission."""
    if not os.path.exists(path):
        if os.path.islink(path):
            raise FileNotFoundError(f"no {what} at '{path}': it is a symbolic link to '{os.readlink(path)}', "
                                    "which does not exist (a broken link)")
        raise FileNotFoundError(f"no {what} at '{path}' (absolute: {os.path.abspath(path)})")
    if os.path.isdir(path):
        raise IsADirectoryError(f"'{path}' is a folder; give the path of a {what} file")
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise ValueError(f"'{path}' is {kind}, not a regular file; a {what} is a file (fnnet reads its size and "
                         "checks it before reading it): copy the data to a file first")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read '{path}': permission denied")


def _damaged(path: str, why: str) -> ValueError:
    return ValueError(f"'{path}' is corrupted or not an fnnet checkpoint: {why}")


def _check_header(path: str, raw: bytes) -> None:
    """The header (``raw``, as read) must be exactly what safetensors writes: compact JSON, then spaces up to 8
    bytes."""
    text = raw.rstrip(b" ")
    try:
        canonical = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise _damaged(path, "the header is not valid JSON") from None
    if canonical != text:
        raise _damaged(path, "the header has been altered (it is not the JSON safetensors wrote)")


# safetensors' dtype names (its format's spec); a name missing here is checked by safetensors alone
_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"))
    if hasattr(torch, attr)}
_Declared = collections.namedtuple("_Declared", "dtype shape")  # what the digest reads of a tensor, from the header
_CHUNK = 1 << 24  # the bytes read at a time to check a tensor's CRC before anything is allocated for it


def _unreadable(path: str, why: str) -> ValueError:
    return ValueError(f"'{path}' ({os.path.getsize(path)} bytes) is not a readable safetensors checkpoint: it is "
                      f"truncated, corrupted or another format ({why})")


def _declared(path: str) -> tuple[bytes, dict[str, Any], dict[str, str]]:
    """``(the header as read, {name: header entry}, metadata)`` from the header alone, after checking that every
    tensor's declared size fits its dtype and shape and lies inside the file (nothing is allocated yet)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _unreadable(path, "shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _unreadable(path, f"its header declares {n} bytes, past the end of the file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise _unreadable(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _damaged(path, "the header's metadata is not a map of strings")
    room = size - 8 - n
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = _DTYPES.get(entry["dtype"])
        except (TypeError, ValueError, KeyError):
            raise _damaged(path, f"the header's entry of tensor {name!r} is malformed") from None
        if not 0 <= begin <= end <= room or any(d < 0 for d in shape):
            raise _unreadable(path, f"tensor {name!r} is declared at bytes [{begin}, {end}) of a data section of "
                              f"{room} bytes")
        if dtype is not None and math.prod(shape) * dtype.itemsize != end - begin:
            raise _damaged(path, f"tensor {name!r} is declared as {entry['dtype']}{shape} "
                           f"({math.prod(shape) * dtype.itemsize} bytes) over {end - begin} bytes")
    return raw, header, metadata


def _check_before_reading(path: str, raw: bytes, header: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """An fnnet file's header, digest and every tensor's CRC-32, from the file in chunks of :data:`_CHUNK`
    bytes: a file whose sizes or bytes are wrong fails here, before a tensor is allocated."""
    _check_header(path, raw)
    start = 8 + len(raw)
    digest = metadata.get(META_DIGEST)
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise _damaged(path, "its checksum entry is missing or malformed")
    unknown = sorted(k for k, e in header.items() if e["dtype"] not in _DTYPES)
    if unknown:
        raise _damaged(path, f"tensors {unknown} have dtypes fnnet never writes")
    shapes = {k: _Declared(_DTYPES[e["dtype"]], e["shape"]) for k, e in header.items()}
    if _digest(metadata, shapes) != digest:
        raise _damaged(path, "the metadata (structure, checksums, tensor names, dtypes or shapes) fails its checksum")
    try:
        crcs = json.loads(metadata.get(META_CRC, ""))
    except ValueError:
        raise _damaged(path, "the per-tensor checksums are not valid JSON") from None
    if not isinstance(crcs, dict) or set(crcs) != set(header) or not all(type(v) is int for v in crcs.values()):
        raise _damaged(path, "the per-tensor checksums do not list every tensor once")
    bad, buffer = [], bytearray(_CHUNK)
    with open(path, "rb") as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            crc, left = 0, end - begin
            while left:
                got = f.readinto(memoryview(buffer)[:min(left, _CHUNK)])
                if not got:
                    raise _damaged(path, f"the file ends inside tensor {name!r}")
                crc, left = zlib.crc32(memoryview(buffer)[:got], crc), left - got
            if crc != crcs[name]:
                bad.append(name)
    if bad:
        raise _damaged(path, f"the data of tensors {sorted(bad)} fails its CRC-32 checksum")


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata, after every check; a plain safetensors file passes unchecked.

    The checks come before any tensor is read: the header's declared sizes against the dtypes, the shapes and
    the file's size, then (an fnnet file) the digest over the header and every tensor's CRC-32, computed from
    the file in chunks. A damaged or crafted file is refused without allocating what it declares.
    """
    check_exists(path, "checkpoint")
    raw, header, declared = _declared(path)
    version = declared.get(META_FORMAT)
    fnnet_file = version is not None or any(k.startswith("fnnet.") for k in declared)
    if fnnet_file and version not in READABLE_FORMATS:
        raise ValueError(
            f"'{path}' has fnnet checkpoint format {version!r}; this fnnet reads formats "
            f"{' and '.join(map(repr, READABLE_FORMATS))} (format 1 files from fnnet 0.1 carried no checksum over "
            "their metadata: load them with that release and save them again)"
        )
    if fnnet_file:
        _check_before_reading(path, raw, header, declared)
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
    if metadata != declared:  # the file changed between the checks and the read
        raise _damaged(path, "it changed while it was read")
    return tensors, metadata
