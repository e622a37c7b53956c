"""README.md is the front page: short, its code is Getting started's, and its links lead into the docs.

The README's Python blocks are the "one screen of code" of ``docs/index.md``, block for block, so
they run once, with the docs' pages (``tests/test_docs.py`` runs every Python block of the site,
each page in a fresh namespace). The distributed script, the guides and the tables live in
``docs/``.
"""

from __future__ import annotations

import re

from _blocks import DOCS, ROOT, python_blocks, script_blocks

README = (ROOT / "README.md").read_text()


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250
    # the two quick-start commands, exactly: the main job and the tests (CI runs the second)
    assert "pip install -e . && fnnet train digits --epochs 10 --device auto --out runs/digits\n" in README
    assert 'pip install -e ".[dev,jax]" && python -m pytest -q\n' in README
    assert "pip install torch==2.13.0" in README  # the CPU wheel first
    assert not script_blocks(README)


def test_the_readmes_code_is_getting_starteds_and_runs_there():
    blocks = python_blocks(README)
    assert len(blocks) == 2
    assert blocks == python_blocks((DOCS / "index.md").read_text())


def test_every_link_of_the_readme_leads_to_a_file():
    links = [target for target in re.findall(r"\]\(([^)]+)\)", README) if "://" not in target]
    assert len(links) >= 15
    for target in links:
        assert (ROOT / target.split("#")[0]).is_file(), target
    # every guide is reachable from the front page
    guides = {f"docs/guides/{p.name}" for p in (DOCS / "guides").glob("*.md")}
    assert guides <= set(links), sorted(guides - set(links))
