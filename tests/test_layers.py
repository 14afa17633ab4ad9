"""Imports run one way: the import-linter contracts in pyproject.toml, no file-level circles, a pure predictor.

Each guard is also shown to fail: the tests copy the product packages into a temporary tree, add one
offending import there and check that the guard names it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "checkpointing", "monitoring", "trainer", "memory_predictor", "cluster", "configs")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    command = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    return subprocess.run([*command, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def _copy_product(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def import_cycles(tree: Path, packages: tuple[str, ...] = PACKAGES) -> list[list[str]]:
    """Strongly connected groups of product modules (any import, also lazy and TYPE_CHECKING ones).

    Runs in a fresh interpreter rooted at ``tree``: grimp finds packages through the import
    system, which in this process already holds the repository's own copies."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("import_cycles.py")), *packages],
                         cwd=tree, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.timeout(300)
def test_import_contracts_hold() -> None:
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.timeout(300)
def test_import_contracts_fail_when_the_trainer_imports_the_launcher(tmp_path: Path) -> None:
    tree = _copy_product(tmp_path)
    loop = tree / "trainer" / "loop.py"
    loop.write_text(loop.read_text() + "\nfrom launcher import console  # noqa: E402\n")
    out = _lint_imports(tree)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout
    assert "trainer.loop -> launcher.console" in out.stdout


@pytest.mark.timeout(300)
def test_predictor_contract_fails_when_it_imports_the_trainer(tmp_path: Path) -> None:
    tree = _copy_product(tmp_path)
    spec = tree / "memory_predictor" / "spec.py"
    spec.write_text(spec.read_text() + "\nimport trainer.metrics  # noqa: E402\n")
    out = _lint_imports(tree)
    assert out.returncode != 0
    assert "memory_predictor.spec -> trainer.metrics" in out.stdout


def test_no_import_circles_between_product_files() -> None:
    assert import_cycles(ROOT) == []


def test_a_circle_is_found(tmp_path: Path) -> None:
    tree = _copy_product(tmp_path)
    jobs = tree / "launcher" / "jobs.py"
    jobs.write_text(jobs.read_text() + "\n\ndef _late() -> None:\n    from launcher import sweep  # noqa: F401\n")
    cycles = import_cycles(tree)
    assert any({"launcher.jobs", "launcher.sweep"} <= set(group) for group in cycles), cycles


@pytest.mark.timeout(120)
def test_predictor_search_imports_neither_torch_nor_megatron() -> None:
    script = (
        "import sys\n"
        "from memory_predictor.cli import main\n"
        "rc = main(['search', '--model', 'llama3.3_70b', '--gpu', 'h100-80gb', '--nodes', '32', "
        "'--gpus-per-node', '8', '--seq', '8192', '--gbs', '1024', '--json'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'megatron', 'trainer', 'launcher', 'hydra', 'omegaconf'))\n"
        "print('HEAVY', heavy, 'RC', rc, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HEAVY [] RC 0" in out.stderr, out.stderr[-3000:]
    assert '"evaluated"' in out.stdout and '"fitting"' in out.stdout, out.stdout[:500]
