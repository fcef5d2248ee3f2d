"""The import graph runs one way: leaves (errors, fileio) <- data <- models <- the trainer and the
entry points; configs read only config_defaults; a model file composes base and layers, never
another model. Read from the sources with `ast` (nothing is imported), so it runs in well under
a second."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imported(path: pathlib.Path) -> set[str]:
  """Every module an `import` anywhere in the file may name (a `from a import b` counts as
  both a and a.b, since b may be a module)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return found


def project_imports(path: pathlib.Path) -> set[str]:
  """The project's modules among `imported(path)` (the empty package `mian_jax` left out)."""
  return {m for m in imported(path)
          if m != "mian_jax" and m.split(".")[0] in ("mian_jax", "configs", "launch", "benchmarks")}


def within(module: str, allowed: tuple[str, ...]) -> bool:
  return any(module == a or module.startswith(a + ".") for a in allowed)


def files(folder: str) -> list[pathlib.Path]:
  return sorted((ROOT / folder).glob("*.py"))


@pytest.mark.parametrize("path", files("mian_jax/data"), ids=lambda p: p.name)
def test_data_imports_only_data_and_the_leaves(path):
  # `mian_jax.data` itself: names imported from the package (`from mian_jax.data import x`).
  allowed = ("mian_jax.data", "mian_jax.encoding", "mian_jax.errors", "mian_jax.fileio")
  assert {m for m in project_imports(path) if not within(m, allowed)} == set()


@pytest.mark.parametrize("path", [*files("configs"), ROOT / "mian_jax/config_defaults.py"],
                         ids=lambda p: p.name)
def test_configs_import_only_the_defaults(path):
  allowed = ("mian_jax.config_defaults", "configs")
  assert {m for m in project_imports(path) if not within(m, allowed)} == set()
  assert not {m for m in imported(path) if within(m, ("flax", "jax"))}


@pytest.mark.parametrize("path", [p for p in files("mian_jax/models") if p.name != "__init__.py"],
                         ids=lambda p: p.name)
def test_a_model_file_imports_no_other_model_file(path):
  allowed = ("mian_jax.models.base", "mian_jax.models.layers", "mian_jax.data.schema",
             "mian_jax.errors")
  found = {m for m in project_imports(path) if m != "mian_jax.models"}
  assert {m for m in found if not within(m, allowed)} == set()


@pytest.mark.parametrize("name", ["errors", "fileio"])
def test_leaves_import_nothing_of_the_project(name):
  assert project_imports(ROOT / "mian_jax" / f"{name}.py") == set()


def test_the_rules_see_imports_inside_functions(tmp_path):
  path = tmp_path / "example.py"
  path.write_text("def f():\n  from mian_jax import cli\n  import mian_jax.models.din\n")
  assert {"mian_jax.cli", "mian_jax.models.din"} <= project_imports(path)
