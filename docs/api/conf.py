"""Sphinx configuration of the API reference (autodoc + napoleon), built offline.

    sphinx-build -W --keep-going -b html docs/api docs/api/_build     # from the checkout root

tests/test_docs_build.py builds it the same way and fails on any warning.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT not in sys.path:  # a checkout: document the library in it (an installed flythinker works too)
    sys.path.insert(0, ROOT)

project = "flythinker"
author = "flythinker contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]  # no intersphinx: the build never reaches the network

# Google-style "Args:" / "Returns:" sections; the docstrings write code in single backticks (Markdown style)
napoleon_google_docstring = True
napoleon_numpy_docstring = False
default_role = "code"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# The library's annotations name torch / transformers types; without intersphinx they are plain text, not links.
nitpicky = False
suppress_warnings = ["config.cache"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
