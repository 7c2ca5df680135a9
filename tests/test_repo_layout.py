"""Repository layout: what is installed, and that the docs the code cites are in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = {".venv", ".git", "build", "results", "ditdeploy.egg-info"}


def _texts() -> list[Path]:
    return [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml") and p.is_file()
            and not (set(p.relative_to(ROOT).parts) & SKIP)]


def test_cited_docs_exist_and_no_outside_references():
    cited, missing, outside = set(), [], []
    for p in _texts():
        text = p.read_text(errors="replace")
        for line in text.splitlines():
            if "onnx-tensorrt" in line or "operators.md" in line and "TensorRT" in text:
                continue  # onnx-tensorrt's own docs/operators.md (another repository), named with it
            for m in re.finditer(r"docs/[A-Za-z0-9_.-]+\.md", line):
                cited.add(m.group(0))
                if not (ROOT / m.group(0)).is_file():
                    missing.append(f"{p.relative_to(ROOT)}: {m.group(0)}")
        if p.name != "test_repo_layout.py" and re.search(r"\bREFERENCE\.md\b|/work/shared|shared/REFERENCE", text):
            outside.append(str(p.relative_to(ROOT)))
    assert "docs/reference.md" in cited  # the scan sees the citations
    assert missing == [] and outside == [], (missing, outside)


def test_experiments_are_not_installed_and_bench_keeps_the_harness():
    text = (ROOT / "pyproject.toml").read_text()
    setuptools = text[text.index("[tool.setuptools]"):text.index("[tool.setuptools.package-data]")]
    assert '"ditdeploy.bench"' in setuptools and "experiments" not in setuptools
    bench = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
    assert bench == ["__init__.py", "harness.py", "load.py", "machine.py", "report.py"]
    assert (ROOT / "experiments" / "__init__.py").is_file()


def test_every_package_folder_is_installed():
    """Each folder with an ``__init__.py`` under the five package roots is in pyproject's package list (a missing one
    works in an editable checkout and is absent from a wheel: ``ditdeploy.serving`` was, before issue 22's layout)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, roots = set(setuptools["packages"]), {v: k for k, v in setuptools["package-dir"].items()}
    found = set()
    for folder, pkg in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if set(rel.parts) & SKIP or (folder == "ditdeploy" and rel.parts and rel.parts[0] in roots):
                continue
            found.add(".".join([pkg, *rel.parts]))
    assert "ditdeploy.serving" in found and "ditdeploy.export" in found  # the scan sees nested and mapped packages
    assert found == listed, (sorted(found - listed), sorted(listed - found))


def test_every_module_opens_with_one_line_saying_its_job():
    """Issue 22: every installed module's docstring opens with one complete line (<= 110 chars, ends with '.')."""
    offenders = []
    for folder in ("ditdeploy", "export", "calibration", "runtimes", "bench"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            rel = p.relative_to(ROOT)
            if set(rel.parts) & SKIP:
                continue
            doc = ast.get_docstring(ast.parse(p.read_text()))
            if not doc:
                offenders.append(f"{rel}: no module docstring")
                continue
            lines = doc.split("\n")
            first = lines[0].strip()
            if not first or len(first) > 110 or not first.endswith("."):
                offenders.append(f"{rel}: first line {len(first)} chars: {first[:60]!r}...{first[-20:]!r}")
            elif len(lines) > 1 and lines[1].strip():
                offenders.append(f"{rel}: the first line continues on the next: {lines[1][:60]!r}")
    assert offenders == [], "\n".join(offenders)
