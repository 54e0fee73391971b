"""The package's layers, and one import path per public name.

Each module of ``jaxnorm`` imports only modules of lower layers: (1) checks
and statistics, (2) the core op, then the options the row normalizers share
(``_scaling``), (3) the pure functions, (4) the Flax
modules and the interop modules, (5) the package face. Layer 4 is ordered
within: folding and recalibration work on the pure functions' state only;
``linen`` (recalibration for its modules) and ``pytorch`` (reading a state
as folding does) build on them; ``nnx`` reuses ``linen``'s helpers;
``equinox`` (Equinox's
layers) imports the pure functions and the checks alone, nothing of flax.
The Flax modules never import the PyTorch converter.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib

import pytest

import jaxnorm

PACKAGE = pathlib.Path(jaxnorm.__file__).parent
_SPEC = importlib.util.spec_from_file_location(
    "jaxnorm_docs_api_names", PACKAGE.parent / "docs" / "api_names.py")
api_names = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(api_names)
LAYERS = {
    "_kernel_library": 0,
    "_checks": 1, "_stats": 1, "_kernels": 1,
    "_custom_transpose": 1,
    "_core": 2, "_add_core": 2.1,
    "_weight_core": 2,
    "_scaling": 2.5,
    "batch_norm": 3, "variants": 3, "weight_norm": 3, "residual": 3,
    "dynamic_tanh": 3,
    "folding": 4.0, "recalibration": 4.0, "_modules": 4.0, "equinox": 4.0,
    "linen": 4.1, "pytorch": 4.1,
    "nnx": 4.2,
    "__init__": 5, "kernels/__init__": 5, "kernels/__main__": 5.1,
}


def _imports(path: pathlib.Path) -> set[str]:
  """The jaxnorm modules ``path`` imports (by module name)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "jaxnorm":
        out.update("kernels/__init__" if a.name == "kernels" else a.name
                   for a in node.names)
      elif node.module == "jaxnorm.kernels":
        out.update(f"kernels/{a.name}" for a in node.names)
      elif node.module.startswith("jaxnorm."):
        out.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      out.update(a.name.split(".")[1] for a in node.names
                 if a.name.startswith("jaxnorm."))
  return out


def test_every_module_has_a_layer():
  modules = {str(p.relative_to(PACKAGE).with_suffix(""))
             for p in PACKAGE.glob("**/*.py")}
  assert modules == set(LAYERS), (
      "give each jaxnorm module a layer in LAYERS: "
      f"{sorted(modules ^ set(LAYERS))}")


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_go_down_the_layers(module):
  for dep in _imports(PACKAGE / f"{module}.py"):
    assert dep in LAYERS, f"{module} imports unknown jaxnorm.{dep}"
    assert LAYERS[dep] < LAYERS[module], (f"jaxnorm.{module} (layer {LAYERS[module]}) imports "
                f"jaxnorm.{dep} (layer {LAYERS[dep]})")


@pytest.mark.parametrize("module", ["linen", "nnx"])
def test_flax_modules_do_not_depend_on_the_pytorch_converter(module):
  assert "pytorch" not in _imports(PACKAGE / f"{module}.py")


def test_equinox_front_end_stands_on_the_pure_functions_alone():
  assert _imports(PACKAGE / "equinox.py") <= {"_checks", "batch_norm",
                                               "variants", "weight_norm"}
  tree = ast.parse((PACKAGE / "equinox.py").read_text())
  outside = {a.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for a in node.names}
  outside |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
  assert "flax" not in outside


def test_each_public_name_has_one_import_path():
  """No object is documented under two modules' ``__all__``."""
  seen: dict[int, str] = {}
  for module, names in api_names.public_names().items():
    mod = importlib.import_module(module)
    for name in names:
      obj = getattr(mod, name)
      if isinstance(obj, (int, float, str, tuple, dict)):
        continue
      where = f"{module}.{name}"
      assert id(obj) not in seen, f"{where} is also {seen[id(obj)]}"
      seen[id(obj)] = where
