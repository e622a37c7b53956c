"""The documentation site (``docs/``, ``mkdocs.yml``): it builds strictly, every public name has a
docstring and annotations, every public module has an API page, and every guide's code runs.

The site is built as its one documented command, ``mkdocs build --strict``, into a temporary
folder: a broken link or anchor, a page missing from the nav, or an API reference that does not
resolve is a warning, and ``--strict`` makes it an error. CI installs the builders with the
``dev`` extra (the ``docs`` extra holds the same pins); without them, outside CI, the build test
skips.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

import fnnet
from _blocks import DOCS, ROOT, env, python_blocks, run_pages, run_script_under_torchrun, script_blocks

# every public module: fnnet's own list, and the submodules its packages document separately
PUBLIC_MODULES = ["fnnet", *(f"fnnet.{m}" for m in fnnet._MODULES), "fnnet.checkpoint.sharded", "fnnet.optim.base",
                  "fnnet.optim.transforms", "fnnet.optim.aliases", "fnnet.optim.schedules", "fnnet.optim.torch_optim",
                  "fnnet.optim.master", "fnnet.interop.jax"]
# where the API reference renders a public module (fnnet.interop re-exports fnnet.interop.jax)
API_HOME = {"fnnet.optim": "fnnet.optim.base", "fnnet.interop": "fnnet.interop.jax"}


def pages() -> dict[str, str]:
    """Every markdown page of the site, by its path under docs/."""
    return {str(p.relative_to(DOCS)): p.read_text() for p in sorted(DOCS.rglob("*.md"))}


def public_objects() -> list[tuple[str, object]]:
    """``(qualified name, object)`` of every class and function in ``__all__`` of a public module that fnnet
    defines (re-exports of torch's own functions excluded), each once."""
    found, seen = [], set()
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("fnnet"):
                continue
            seen.add(id(obj))
            found.append((f"{name}.{attr}", obj))
    return found


def public_methods(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties a class defines itself (``__call__`` and ``__init__`` included)."""
    out = []
    for attr, value in vars(cls).items():
        if attr.startswith("_") and attr not in ("__call__", "__init__"):
            continue
        fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
        if inspect.isfunction(fn):
            out.append((attr, fn))
    return out


def _auto_doc(obj: object) -> bool:
    """A docstring Python wrote (a namedtuple's or dataclass's ``Name(field, ...)``), not the author."""
    doc = obj.__doc__ or ""
    return inspect.isclass(obj) and "__doc__" in vars(obj) and bool(re.fullmatch(rf"{obj.__name__}\(.*\)", doc.strip(), re.S))


def test_every_public_name_has_a_docstring():
    missing = []
    for name, obj in public_objects():
        if not (obj.__doc__ or "").strip() or _auto_doc(obj) or (inspect.isclass(obj) and "__doc__" not in vars(obj)):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, fn in public_methods(obj):
                if attr == "__init__":
                    continue  # documented on the class (the reference merges it in)
                # an override without one of its own takes its base's docstring, as inspect.getdoc does
                if not inspect.getdoc(getattr(obj, attr)):
                    missing.append(f"{name}.{attr}")
    assert not missing, f"public names without a docstring: {missing}"


def test_every_public_function_is_annotated():
    missing = []
    for name, obj in public_objects():
        functions = [(name, obj)] if inspect.isfunction(obj) else [(f"{name}.{a}", f) for a, f in public_methods(obj)]
        for where, fn in functions:
            if not fn.__module__.startswith("fnnet"):
                continue
            params = inspect.signature(fn).parameters
            bare = [p for p, v in params.items() if p not in ("self", "cls") and v.annotation is inspect.Parameter.empty]
            if "return" not in fn.__annotations__ and not where.endswith("__init__"):
                bare.append("return")
            if bare:
                missing.append(f"{where}: {bare}")
    assert not missing, "public functions without annotations:\n" + "\n".join(missing)


def test_the_step_documents_what_its_methods_return():
    step = fnnet.step.TrainStep
    for method in ("__call__", "flush", "gather_state", "shard_state", "local_parts"):
        doc = inspect.getdoc(getattr(step, method))
        assert "Returns:" in doc, method
    assert "(state, metrics)" in inspect.getdoc(step.flush)


def test_every_public_module_has_an_api_page():
    rendered = {m for text in pages().values() for m in re.findall(r"^::: (\S+)$", text, flags=re.M)}
    missing = [m for m in PUBLIC_MODULES if m != "fnnet" and API_HOME.get(m, m) not in rendered]
    assert not missing, f"public modules without an API reference page: {missing}"
    # the names fnnet exports from its private modules are rendered from those modules
    assert {"fnnet._functional", "fnnet._remat", "fnnet._summary"} <= rendered


def test_the_site_builds_strictly(tmp_path):
    if not os.environ.get("CI"):  # CI installs the builders (the dev extra) and must not skip
        pytest.importorskip("mkdocs")
        pytest.importorskip("mkdocstrings_handlers.python")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # the reference was generated from the docstrings, the step's methods included
    step_page = (tmp_path / "site" / "api" / "step" / "index.html").read_text()
    assert "fnnet.step.TrainStep.flush" in step_page and "(state, metrics)" in step_page


@pytest.mark.slow
def test_every_python_block_of_the_guides_runs(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    with_code = {name: text for name, text in pages().items() if python_blocks(text)}
    assert len(with_code) >= 8, sorted(with_code)
    proc = run_pages(with_code, tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("--- page") == len(with_code)


@pytest.mark.slow
@pytest.mark.parametrize("page, name, code", [(p, n, c) for p, t in pages().items() for n, c in script_blocks(t)],
                         ids=lambda v: v if isinstance(v, str) and v.endswith((".md", ".py")) else "")
def test_the_guides_scripts_run_under_torchrun(tmp_path, page, name, code):
    proc = run_script_under_torchrun(name, code, tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    if name == "train.py":
        assert list((tmp_path / "ckpt-ddp").glob("*.safetensors")), "rank 0 wrote no checkpoint"


# -- the API surface a reference exposes ---------------------------------------------------------------------------------
def test_fnnet_version_answers_without_importing_torch_and_is_the_packages():
    import tomllib

    out = subprocess.run([sys.executable, "-m", "fnnet", "--version"], env=env(), capture_output=True, text=True,
                         check=True).stdout
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.strip() == f"fnnet {fnnet.__version__}" == f"fnnet {version}"
    code = ("import sys, fnnet.cli\ntry:\n    fnnet.cli.build_parser().parse_args(['--version'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True,
                          check=True).stdout.split()[-1] == "False"


def test_the_package_ships_py_typed():
    import tomllib

    assert (ROOT / "fnnet" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["fnnet"]


def test_every_code_block_is_run_or_declared_shown():
    # a block fenced otherwise (```py, ```pycon, ```sh ...) would be neither run nor said to be shown only
    import re

    fence = re.compile(r"^```([^\n]*)$", re.M)
    bad = []
    for name, text in {**pages(), "README.md": (ROOT / "README.md").read_text()}.items():
        opens = fence.findall(text)[::2]  # every other fence opens a block
        bad += [f"{name}: ```{info}" for info in opens
                if info.split(" ")[0] not in ("python", "bash", "text")]
    assert not bad, f"blocks neither run (python) nor shown (bash, text): {bad}"
