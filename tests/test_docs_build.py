"""The API reference (docs/api, Sphinx autodoc + napoleon) builds offline with no warning: a docstring that breaks
reStructuredText, a documented name that no longer imports, or a Google-style section napoleon cannot read fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

sphinx_build = pytest.importorskip("sphinx.cmd.build", reason="sphinx is in the `dev` extra")

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api"


@pytest.mark.filterwarnings("ignore:The mapping interface for autodoc options")  # Sphinx 9 napoleon, not ours
def test_api_reference_builds_without_warnings(tmp_path):
    out, doctrees = tmp_path / "html", tmp_path / "doctrees"
    warnings = tmp_path / "warnings.txt"
    status = sphinx_build.build_main(["-W", "--keep-going", "-E", "-q", "-b", "html", "-d", str(doctrees),
                                      "-w", str(warnings), str(DOCS), str(out)])
    assert status == 0, warnings.read_text()
    page = (out / "index.html").read_text(encoding="utf-8")
    # the public entry points are documented, with their Args sections rendered as parameter lists
    for name in ("from_pair", "from_pretrained", "generate", "build_views", "EmpathyJudge", "train_loop"):
        assert name in page, name
    assert "Parameters" in page
