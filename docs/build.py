"""Builds the documentation site into docs/_build/html (opens from disk).

    python docs/build.py [--out DIR]

Needs the ``docs`` extra (``pip install -e '.[docs]'``) and ``npm``: MathJax
is installed once from the npm registry into docs/_build/npm/node_modules and
served from the site's ``_static/mathjax``, so formulas render offline.
The build treats every warning as an error (``-W --keep-going -n``): broken
cross-references, RST errors in docstrings, public names without docstrings.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys

DOCS = pathlib.Path(__file__).resolve().parent
MATHJAX_VERSION = "3.2.2"
NODE_PREFIX = DOCS / "_build" / "npm"


def mathjax_dir(prefix: pathlib.Path = NODE_PREFIX) -> pathlib.Path:
  """The npm package's ``es5`` folder, installed on first use."""
  package = prefix / "node_modules" / "mathjax"
  installed = package / "package.json"
  if not installed.exists() or f'"version": "{MATHJAX_VERSION}"' not in \
      installed.read_text():
    npm = shutil.which("npm")
    if npm is None:
      raise SystemExit("docs/build.py: `npm` not found; install Node.js "
                       "(Debian: apt-get install npm) to fetch MathJax.")
    prefix.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(prefix), "--no-save",
                    "--no-package-lock", "--no-audit", "--no-fund",
                    f"mathjax@{MATHJAX_VERSION}"], check=True)
  return package / "es5"


def staged_mathjax() -> pathlib.Path:
  """A folder holding ``mathjax`` -> the es5 folder, for html_static_path.

  Sphinx copies a static folder's contents into the site's ``_static``, so
  the site gets ``_static/mathjax/tex-chtml.js`` and its fonts.
  """
  es5 = mathjax_dir()
  staged = DOCS / "_build" / "static"
  link = staged / "mathjax"
  if not (link.is_symlink() and link.resolve() == es5.resolve()):
    staged.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
      link.unlink()
    link.symlink_to(es5, target_is_directory=True)
  return staged


def build(out: pathlib.Path, extra_args: tuple[str, ...] = ()) -> None:
  """Runs sphinx-build with warnings as errors into ``out``."""
  cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going",
         "-n", "-q", "-E", str(DOCS), str(out), *extra_args]
  subprocess.run(cmd, check=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path,
                      default=DOCS / "_build" / "html")
  args = parser.parse_args()
  build(args.out)
  print(f"built {args.out / 'index.html'}")


if __name__ == "__main__":
  main()
