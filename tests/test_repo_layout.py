"""Repository layout: what is installed, and that the docs the code cites are in the repository."""

from __future__ import annotations

import re
from pathlib import Path

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
    assert bench == ["__init__.py", "h2h_diffusers.py", "harness.py", "load.py", "machine.py", "report.py"]
    assert (ROOT / "experiments" / "__init__.py").is_file()
