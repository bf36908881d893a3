"""The API reference builds from the docstrings with no warning: ``python -m pytest -m docs``.

The same command by hand: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.docs
def test_sphinx_builds_the_api_reference_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="pip install -e '.[docs]'")
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert not out.stderr.strip(), out.stderr[-4000:]  # -q prints only warnings and errors
    pages = {path.name for path in tmp_path.glob("*.html")}
    assert {"index.html", "quantize.html", "config.html", "cli_reference.html", "deploy.html", "report.html"} <= pages
    cli = (tmp_path / "cli_reference.html").read_text()
    assert "tvmquant report" in cli and "--bench" in cli  # generated from the parser
    assert "QuantConfig" in (tmp_path / "config.html").read_text()
    assert "build_report" in (tmp_path / "report.html").read_text()
