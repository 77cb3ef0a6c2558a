"""The package's import architecture (docs/architecture.md).

- The import-linter contracts in setup.cfg, run with the virtualenv's `lint-imports`: the `layers`
  contract (each package imports only from layers below it; `a | b` siblings not from each other)
  and the `index-without-encoders` contract (index never imports encode or recommend).
- The generated package graph in docs/architecture.md matches the code (`tools/package_graph.py`).

The CLI fronts every entry point, the demo included, so `cli` sits above `demo`.
"""

from __future__ import annotations

import configparser
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP_CFG = ROOT / "setup.cfg"
LAYERS = "layers"  # contract ids in setup.cfg ([importlinter:contract:ID])
FORBIDDEN = "index-without-encoders"

def _lint_imports(cwd: Path, *contracts: str) -> subprocess.CompletedProcess:
    """`lint-imports` of this virtualenv on the setup.cfg in `cwd`, limited to `contracts`."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.is_file():
        pytest.fail(f"{exe} not found: install the test extra (pip install -e '.[test]'), which brings import-linter")
    args = [str(exe), "--no-cache"] + [a for c in contracts for a in ("--contract", c)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"lint-imports exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"


def test_setup_cfg_declares_the_contracts():
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    assert cfg["importlinter"]["root_package"] == "pixelrec"
    layers = [line.strip() for line in cfg[f"importlinter:contract:{LAYERS}"]["layers"].splitlines() if line.strip()]
    assert layers == ["__main__", "cli", "cli_boundary", "demo", "runs", "recommend | index", "encode", "data", "distributed", "runtime", "errors"]
    assert f"importlinter:contract:{FORBIDDEN}" in cfg


def test_index_never_imports_encode_or_recommend():
    proc = _lint_imports(ROOT, FORBIDDEN)
    assert proc.returncode == 0, _report(proc)


@pytest.mark.smoke
def test_layers_contract():
    """No module imports a package above it (imports inside functions count too)."""
    proc = _lint_imports(ROOT, LAYERS)
    assert proc.returncode == 0, _report(proc)


def _package_graph_tool():
    """tools/package_graph.py as a module (tools/ is a folder of scripts, not a package)."""
    name = "_pixelrec_tools_package_graph"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "package_graph.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_architecture_doc_matches_the_code():
    tool = _package_graph_tool()
    committed = tool.DOC.read_text(encoding="utf-8")
    assert committed == tool.expected_doc(), (
        f"docs/architecture.md no longer matches the imports in the code; regenerate it with "
        f"`{tool.COMMAND}` (and check the diff with `{tool.COMMAND} --check`)"
    )

