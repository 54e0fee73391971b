"""Sphinx configuration of jaxnorm's documentation site.

Build with ``python docs/build.py`` (it fetches MathJax from the npm registry
once, then runs ``sphinx-build -W --keep-going -n``). The API reference is
generated from the docstrings: every public module that declares ``__all__``
gets a page, and every name in its ``__all__`` gets an entry.
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax.typing
from sphinx.util import logging
from sphinx.util.typing import stringify_annotation

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import jaxnorm  # noqa: E402  (after the path insert: the checkout is documented)
from api_names import api_modules, missing_docstrings  # noqa: E402
from build import staged_mathjax  # noqa: E402

project = "jaxnorm"
author = "jaxnorm developers"
copyright = "jaxnorm developers"  # noqa: A001  (Sphinx's name)
release = version = jaxnorm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

# Guides are Markdown (MyST) with $...$ and $$...$$ math; the API pages are
# generated reStructuredText.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
root_doc = "index"
exclude_patterns = ["_build", "node_modules", "README.md"]
templates_path = ["_templates"]

# API reference: docstrings are Google style with RST math.
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's __all__ is its public API
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = True
python_use_unqualified_type_names = False

# Offline math: MathJax 3 from the npm registry (installed on first use by
# build.py's staged_mathjax, also when sphinx-build is run directly), copied
# into the site's _static/mathjax: never a CDN.
html_static_path = [str(staged_mathjax())]  # holds mathjax/ -> the es5 folder
mathjax_path = "mathjax/tex-chtml.js"
mathjax3_config = {"chtml": {"matchFontHeight": False}}

html_theme = "furo"
html_title = f"jaxnorm {release}"
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None

# Warnings are errors (-W -n). External projects' names in signatures (jax,
# flax, numpy, torch, equinox, the standard library) cannot be resolved offline (no
# intersphinx), so only they are exempt; jaxnorm's own references must
# resolve.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|nnx|nn|numpy|np|optax|torch|chex|equinox|"
               r"eqx)(\..*)?"),
    (r"py:.*", r"(typing|collections|types|builtins|enum|dataclasses|"
               r"pathlib)\..*"),
    (r"py:.*", r"(Array|ArrayLike|Any|Callable|Sequence|Mapping|Iterable|"
               r"DTypeLike|Dtype|PRNGKey|Shape|Axes|Initializer|"
               r"PromoteDtypeFn|NoneType|Ellipsis|optional)"),
]


def _write_api_index() -> None:
  """Writes api/index.rst (generated, git-ignored) from ``api_modules()``.

  autosummary then writes one page per module and one per public name.
  """
  api = DOCS / "api"
  api.mkdir(exist_ok=True)
  modules = "\n".join(f"   {m}" for m in api_modules())
  text = (
      "API reference\n=============\n\n"
      "Generated from the docstrings: one page per public module, one entry"
      " per name in its ``__all__``.\n\n"
      ".. autosummary::\n   :toctree: generated\n"
      "   :template: jaxnorm-module.rst\n\n" + modules + "\n")
  index = api / "index.rst"
  if not index.exists() or index.read_text() != text:
    index.write_text(text)


_write_api_index()


def _check_docstrings(app) -> None:
  """A public name without a docstring is a build warning (so an error)."""
  del app
  log = logging.getLogger("jaxnorm.docs")
  for name in missing_docstrings():
    log.warning("%s has no docstring: every public name needs one", name,
                type="jaxnorm", subtype="docstring")


# Reprs of default values that make a signature unparsable (it would then
# be shown as raw text, ``~`` prefixes included): flax modules' dataclass
# defaults such as ``<class 'jax.numpy.float32'>`` or ``<function zeros>``.
_REPRS = [
    (re.compile(r"<class '([\w.]+)'>"), r"\1"),
    (re.compile(r"<function ([\w.]+)(?: at 0x[0-9a-f]+)?>"), r"\1"),
    (re.compile(r"<([\w.]+) object(?: at 0x[0-9a-f]+)?>"), r"\1()"),
]


def _tidy_signature(app, what, name, obj, options, signature,
                    return_annotation):
  """Shorter, parsable signatures.

  ``jax.typing.ArrayLike`` is shown instead of its eight-member union
  (``autodoc_type_aliases`` cannot do it: the annotations are strings and
  ``ArrayLike | None`` then renders as a ``TypeAliasForwardRef``), and
  default-value reprs are replaced by the names they show.
  """
  del app, what, name, obj, options
  if signature is None:
    return None
  for mode in ("smart", "fully-qualified"):
    union = stringify_annotation(jax.typing.ArrayLike, mode)
    signature = signature.replace(union, "~jax.typing.ArrayLike")
    if return_annotation:
      return_annotation = return_annotation.replace(union,
                                                    "~jax.typing.ArrayLike")
  for pattern, repl in _REPRS:
    signature = pattern.sub(repl, signature)
  return signature, return_annotation


def setup(app):
  app.connect("builder-inited", _check_docstrings)
  app.connect("autodoc-process-signature", _tidy_signature)
