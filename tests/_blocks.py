"""The code blocks of README.md and of the docs pages, and how the tests run them.

A block fenced ```` ```python ```` runs; a block fenced ```` ```python title="NAME.py" ```` (in the
docs; ```` ```python NAME.py ```` in the README) is a file for a launcher, run under ``torchrun``.
Other fences (``bash``, ``text``) are shown, not run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_RUN = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
_SCRIPT = re.compile(r'^```python (?:title=")?(\S+?\.py)"?\n(.*?)^```', flags=re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The code of every block that runs in one plain process, in order."""
    return _RUN.findall(text)


def script_blocks(text: str) -> list[tuple[str, str]]:
    """``(file name, code)`` of every block that is a script for a launcher."""
    return _SCRIPT.findall(text)


def program_of(text: str) -> str:
    """The blocks of one page as one program whose line numbers are the page's (tracebacks point into the page)."""
    program, line = "", 1
    for match in _RUN.finditer(text):
        start = text.count("\n", 0, match.start(1)) + 1
        program += "\n" * (start - line) + match.group(1)
        line = start + match.group(1).count("\n")
    return program


def env() -> dict[str, str]:
    """This checkout first on PYTHONPATH, no launcher's variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**base, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_pages(pages: dict[str, str], tmp_path: Path, *, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run each page's blocks in one fresh ``python`` process, every page in its own namespace and folder.

    ``pages`` maps a page's name (shown in tracebacks) to its text. The pages share the process (one
    ``import torch``), not their names: each page's blocks must run on their own, as a reader copies them.
    """
    driver = ["import os, matplotlib", "matplotlib.use('Agg')", f"_pages = {list(pages)!r}"]
    for i, (name, text) in enumerate(pages.items()):
        folder = tmp_path / f"page{i}"
        folder.mkdir()
        source = tmp_path / f"page{i}.py"
        source.write_text(program_of(text))
        driver += [f"print('--- page', {name!r}, flush=True)", f"os.chdir({str(folder)!r})",
                   f"exec(compile(open({str(source)!r}).read(), {name!r}, 'exec'), {{'__name__': '__main__'}})"]
    script = tmp_path / "pages.py"
    script.write_text("\n".join(driver) + "\n")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def run_script_under_torchrun(name: str, code: str, tmp_path: Path, *, nproc: int = 2,
                              timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc NAME`` on gloo over localhost, in ``tmp_path``."""
    (tmp_path / name).write_text(code)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {**env(), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), name]
    return subprocess.run(cmd, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=timeout)
