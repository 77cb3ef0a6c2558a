"""The docs/ pages stay true to the code: every test a page cites exists, and every page the
docs index lists is there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CITED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.smoke
def test_every_cited_test_exists():
    cited = [(page.name, *m.groups()) for page in DOCS.glob("*.md") for m in CITED.finditer(page.read_text())]
    assert len(cited) >= 30, "docs/guarantees.md should back each guarantee with a test"
    missing = [f"{page}: {file}::{name}" for page, file, name in cited
               if not (ROOT / file).is_file() or name not in _test_functions(ROOT / file)]
    assert missing == [], "docs cite tests that do not exist (renamed or removed?):\n" + "\n".join(missing)


@pytest.mark.smoke
def test_the_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert linked == pages
