"""The documentation site: its code runs, it builds, and it reads right.

* Every ```python block of docs/**/*.md runs, in order, one namespace per
  page (blocks tagged bash, text or console are not run; an untagged block
  is an error, so nothing escapes by accident).
* Every public name has a docstring.
* The site builds with warnings as errors (docs/build.py: MathJax from npm,
  ``sphinx-build -W --keep-going -n``); every public name has its page and
  entry; no page loads a script, style or font from the internet.
* Headless Chromium renders API pages and guides: MathJax typeset every
  formula, no TeX error, no raw ``\\frac`` left in the text; screenshots of
  an API page and a guide are saved next to the built site.

The build and browser checks skip when sphinx, npm or chromium is missing,
except under CI (``CI=true``), where a missing tool fails.
"""

from __future__ import annotations

import concurrent.futures
import html
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted(p for p in DOCS.rglob("*.md")
                if "_build" not in p.parts and "node_modules" not in p.parts)
RUN_LANGS = {"python"}
SHOW_LANGS = {"bash", "text", "console"}


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


api_names = _load("jaxnorm_docs_api_names", DOCS / "api_names.py")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
  """(language tag, code) of every ``` fence, MyST directives excluded."""
  blocks = re.findall(r"^```([^\n]*)\n(.*?)^```\s*$", text, flags=re.S | re.M)
  return [(lang.strip(), code) for lang, code in blocks
          if not lang.strip().startswith("{")]


# What a page's blocks must leave behind, keyed by a line of the block.
def _check_linen(ns):
  assert ns["logits"].shape == (8, 10)
  assert set(ns["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}  # flax's
  assert np.isfinite(float(ns["loss"]))


def _check_nnx(ns):
  assert ns["logits"].shape == (8, 10)
  assert ns["model"].bn.count is None  # flax's state
  assert np.isfinite(float(ns["loss"]))


def _check_debias(ns):
  np.testing.assert_allclose(ns["deb"].var, 0.25, rtol=0.1)
  assert (np.asarray(ns["ema"].var) > 0.98).all()


def _check_masked_devices(ns):
  np.testing.assert_allclose(ns["state"].mean, np.full((2, 1), 10 / 9),
                             rtol=1e-6)


def _check_pytorch(ns):
  import torch  # pylint: disable=import-outside-toplevel
  ref = ns["tmodel"](torch.from_numpy(ns["x"])).detach().numpy()
  np.testing.assert_allclose(ns["y"], ref.transpose(0, 2, 3, 1), atol=1e-5)
  assert int(ns["state"].count) == 10


def _check_equinox(ns):
  assert ns["logits"].shape == (32, 10)
  assert np.isfinite(float(ns["value"]))
  assert int(ns["state"].get(ns["model"].norm.batch_counter)) == 3


CHECKS = {
    "guides/getting-started.md": {
        "import jaxnorm.linen as jnn  # drop-in": _check_linen,
        "import jaxnorm.nnx as jnnx  # drop-in": _check_nnx,
    },
    "guides/batchnorm.md": {"# Debiased EMA": _check_debias},
    "guides/distributed.md": {"axis_name=\"devices\"": _check_masked_devices},
    "guides/pytorch.md": {"def stats_fn": _check_pytorch},
    "guides/equinox.md": {"import jaxnorm.equinox as jnx": _check_equinox},
}


def test_every_fence_is_tagged_and_the_guides_have_code():
  for page in GUIDES:
    for lang, _ in fenced_blocks(page.read_text()):
      assert lang in RUN_LANGS | SHOW_LANGS, (
          f"{page.relative_to(ROOT)}: a ``` block tagged {lang!r}; tag it "
          f"python (run by this test) or one of {sorted(SHOW_LANGS)}")
  for name in CHECKS:
    assert DOCS / name in CODE_PAGES, name


CODE_PAGES = [p for p in GUIDES if "```python" in p.read_text()]


@pytest.mark.parametrize("page", CODE_PAGES,
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_doc_python_blocks_run(page, capsys):
  blocks = [code for lang, code in fenced_blocks(page.read_text())
            if lang in RUN_LANGS]
  rel = str(page.relative_to(DOCS))
  checks = CHECKS.get(rel, {})
  namespace: dict = {"__name__": "docs"}
  checked = set()
  for i, code in enumerate(blocks):
    if "torch" in code and importlib.util.find_spec("torch") is None:
      pytest.skip(f"{rel} python block {i} and later need torch (extra 'torch')")
    exec(compile(code, f"docs/{rel} python block {i}", "exec"), namespace)  # pylint: disable=exec-used
    for marker, check in checks.items():
      if marker in code:
        check(namespace)
        checked.add(marker)
  assert checked == set(checks)
  if rel == "guides/getting-started.md":
    assert "(4, 32, 8, 8, 16) (4, 16)" in capsys.readouterr().out


def test_readme_links_every_guide_and_the_toctree_lists_it():
  readme = (ROOT / "README.md").read_text()
  index = (DOCS / "index.md").read_text()
  for guide in DOCS.glob("guides/*.md"):
    assert f"](docs/guides/{guide.name})" in readme, f"README: link {guide.name}"
    assert f"\nguides/{guide.stem}\n" in index, f"docs/index.md: toctree {guide.stem}"


def test_every_public_name_has_a_docstring():
  assert api_names.missing_docstrings() == []
  names = api_names.public_names()
  assert {"jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.equinox",
          "jaxnorm.pytorch"} <= set(names)
  assert "BatchNormState" in names["jaxnorm"]


# -- the built site ---------------------------------------------------------


def _chromium() -> str | None:
  return shutil.which("chromium") or shutil.which("chromium-browser")


def _need(tool: str, found: bool) -> None:
  if found:
    return
  msg = f"{tool} is missing (docs extra: pip install -e '.[docs]'; Debian: apt-get install chromium npm)"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"CI: {msg}")
  pytest.skip(msg)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  _need("sphinx/furo/myst-parser", all(
      importlib.util.find_spec(m) for m in ("sphinx", "furo", "myst_parser")))
  _need("npm", shutil.which("npm") is not None)
  out = tmp_path_factory.mktemp("site")
  build = _load("jaxnorm_docs_build", DOCS / "build.py")
  build.build(out)  # raises CalledProcessError on any warning
  return out


def _text(page_html: str) -> str:
  """The page's visible text: tags, scripts and styles removed."""
  body = re.sub(r"<(script|style)\b.*?</\1>", "", page_html, flags=re.S)
  return html.unescape(re.sub(r"<[^>]+>", " ", body))


def test_every_public_name_has_its_rendered_entry(site):
  for module, names in api_names.public_names().items():
    page = (site / "api" / "generated" / f"{module}.html").read_text()
    for name in names:
      entry = site / "api" / "generated" / f"{module}.{name}.html"
      assert entry.exists(), f"no reference page for {module}.{name}"
      assert f'id="{module}.{name}"' in entry.read_text(), f"{module}.{name}"
      assert f"{module}.{name}.html" in page, f"{module} page lacks {name}"
  index = (site / "index.html").read_text()
  for guide in GUIDES:
    if guide.parent.name == "guides":
      assert f"guides/{guide.stem}.html" in index, guide.name


def test_no_page_loads_anything_from_the_internet(site):
  remote = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""")
  pages = list(site.rglob("*.html"))
  assert len(pages) > 40
  for page in pages:
    text = page.read_text()
    for tag in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", text):
      assert not remote.search(tag), f"{page.relative_to(site)}: {tag}"
    if 'class="math' in text:
      assert 'src="' in text and "_static/mathjax/tex-chtml.js" in text, page
  for sheet in site.rglob("*.css"):
    urls = re.findall(r"url\(\s*['\"]?([^)'\"]+)", sheet.read_text())
    assert not [u for u in urls if re.match(r"(https?:)?//", u)], sheet
  assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()
  fonts = site / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
  assert len(list(fonts.glob("*.woff"))) > 10


# Pages read in the browser: formula-heavy API entries of each module and the
# guides with math; the screenshots are of the first of each kind.
BROWSER_PAGES = [
    "api/generated/jaxnorm.batch_norm_train.html",
    "api/generated/jaxnorm.group_norm.html",
    "api/generated/jaxnorm.linen.BatchNorm.html",
    "api/generated/jaxnorm.nnx.RMSNorm.html",
    "api/generated/jaxnorm.pytorch.unbiased_running_var_to_torch.html",
    "guides/derivatives.html",
    "guides/batchnorm.html",
]
SCREENSHOTS = {"api/generated/jaxnorm.batch_norm_train.html": "api.png",
               "guides/derivatives.html": "guide.png"}


def _chromium_cmd(profile: str, *args: str) -> list[str]:
  return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
          "--disable-background-networking", "--disable-component-update",
          "--disable-sync", "--no-first-run", "--hide-scrollbars",
          f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]


def _run_chromium(profile: str, *args: str) -> str:
  """Runs headless Chromium once; returns its stdout."""
  proc = subprocess.run(_chromium_cmd(profile, *args), capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def test_browser_renders_the_math(site):
  _need("chromium", _chromium() is not None)
  shots = site.parent / (site.name + "-screenshots")
  shots.mkdir(exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp, \
      concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    doms = [pool.submit(_run_chromium, f"{tmp}/p{i}", "--dump-dom",
                        (site / rel).as_uri())
            for i, rel in enumerate(BROWSER_PAGES)]
    shot_runs = [pool.submit(_run_chromium, f"{tmp}/s{i}",
                             f"--screenshot={shots / name}",
                             "--window-size=1280,1600", (site / rel).as_uri())
                 for i, (rel, name) in enumerate(SCREENSHOTS.items())]
    for rel, future in zip(BROWSER_PAGES, doms):
      dom = future.result()
      source = (site / rel).read_text()
      n_math = len(re.findall(r'class="math notranslate nohighlight"', source))
      assert n_math > 0, f"{rel} has no formula to check"
      assert dom.count("<mjx-container") == n_math, (
          f"{rel}: MathJax typeset {dom.count('<mjx-container')} of "
          f"{n_math} formulas")
      assert "<mjx-merror" not in dom, f"{rel}: a TeX error in a formula"
      text = _text(dom)
      for raw in (r"\frac", r"\sqrt", r"\sum", r"\gamma"):
        assert raw not in text, f"{rel}: raw TeX {raw} left in the page"
    for future in shot_runs:
      future.result()
  for name in SCREENSHOTS.values():
    image = _png_pixels(shots / name)
    assert image.shape[:2] == (1600, 1280)
    assert image.std() > 0.05, f"{name} is blank"
  sys.stdout.write(f"screenshots in {shots}\n")


def _png_pixels(path: pathlib.Path) -> np.ndarray:
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  return matplotlib.image.imread(path)
