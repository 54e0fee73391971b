"""Builds the documentation site into docs/_build/html (opens from disk).

    python docs/build.py [--out DIR]

Needs the ``docs`` extra (``pip install -e '.[docs]'``) and ``npm``: MathJax
is installed once from the npm registry into docs/_build/node_modules and
served from the site's ``_static/mathjax``, so formulas render offline.
The build treats every warning as an error (``-W --keep-going -n``): broken
cross-references, RST errors in docstrings, public names without docstrings.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

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


def build(out: pathlib.Path, extra_args: tuple[str, ...] = ()) -> None:
  """Runs sphinx-build with warnings as errors into ``out``."""
  es5 = mathjax_dir()
  with tempfile.TemporaryDirectory() as static:
    # html_static_path copies a folder's contents: stage es5 as mathjax/.
    os.symlink(es5, pathlib.Path(static) / "mathjax")
    env = dict(os.environ, JAXNORM_DOCS_MATHJAX=static)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going",
           "-n", "-q", "-E", str(DOCS), str(out), *extra_args]
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path,
                      default=DOCS / "_build" / "html")
  args = parser.parse_args()
  build(args.out)
  print(f"built {args.out / 'index.html'}")


if __name__ == "__main__":
  main()
