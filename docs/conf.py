"""Sphinx configuration of tvmquant's API reference.

Build (no warnings allowed): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``pip install -e ".[docs]"``); ``tests/test_docs_build.py`` runs the same build (``-m docs``).
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "tvmquant"
author = "tvmquant developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections carry the types
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
exclude_patterns = ["_build", "quant_math.md", "cli_generated.rst"]
html_theme = "alabaster"
html_static_path = []
suppress_warnings = ["ref.python"]  # ambiguous cross-references between re-exported names


def _write_cli_reference(app) -> None:
    """docs/cli_reference.rst's body: the help of every ``tvmquant`` command, from the parser itself."""
    from tvmquant.cli import build_parser

    parser = build_parser()
    lines = []
    subparsers = next(action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        lines += [f"``tvmquant {name}``", "-" * (len(name) + 13), "", "::", ""]
        lines += ["    " + line for line in sub.format_help().splitlines()]
        lines.append("")
    path = os.path.join(app.srcdir, "cli_generated.rst")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as handle:
            handle.write(text)


def setup(app):
    app.connect("builder-inited", _write_cli_reference)
