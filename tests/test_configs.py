"""Configs: the repository's keep their values, a user's builds on mian_jax.config_defaults from
any folder, and --show_config finds each key's comment in the sources."""

import glob
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from launch import ablations, runner
from mian_jax import cli, config_checks, config_defaults, models
from mian_jax.errors import ConfigError
from tests.helpers import REPO, markdown_rows

# Every key's repr, per config and argument, recorded from configs/*.py before the defaults
# moved from configs/common.py to mian_jax/config_defaults.py. A change of a default that is
# meant is recorded anew with `python -m tests.test_configs` (review the diff).
VALUES = os.path.join(REPO, "tests", "config_values.json")
with open(VALUES) as f:
  RECORDED = json.load(f)


def flat_reprs(tree: dict, prefix: str = "") -> dict[str, str]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat_reprs(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = repr(value)
  return out


def config_values(case: str) -> dict[str, str]:
  """The flat key -> repr of a case "<name>.py[:arg]" of configs/."""
  name, _, arg = case.removesuffix(".py").partition(".py:")
  module = importlib.import_module(f"configs.{name}")
  return flat_reprs((module.get_config(arg) if arg else module.get_config()).to_dict())


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_configs_keep_their_recorded_values(case, monkeypatch):
  monkeypatch.delenv("MIAN_JAX_MOVIELENS_DIR", raising=False)
  assert config_values(case) == RECORDED[case]


def show_config(config_arg: str, *overrides: str, cwd: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "MIAN_JAX_MOVIELENS_DIR"}
  return subprocess.run([sys.executable, "-m", "mian_jax.main", f"--config={config_arg}",
                         "--show_config", *overrides],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def listed(stdout: str) -> dict[str, tuple[str, str]]:
  """key -> (value, comment) from a --show_config listing."""
  rows = {}
  for line in stdout.splitlines():
    if line and not line.startswith("#"):
      key, rest = line.split(None, 1)
      value, _, comment = rest.partition("  # ")
      rows[key] = (value.strip(), comment)
  return rows


def test_a_config_in_any_folder_builds_on_config_defaults(tmp_path):
  (tmp_path / "myexp").mkdir()
  (tmp_path / "myexp" / "my_config.py").write_text(textwrap.dedent('''\
      from mian_jax import config_defaults


      def get_config(arg=None):
        config = config_defaults.get_config_from_args(config_defaults.parse_arg(arg, {}))
        config.model.embed_dim = 32  # wider embeddings for my data
        return config
      '''))
  result = show_config("myexp/my_config.py:model=din", "--config.train.batch_size=256",
                       cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  rows = listed(result.stdout)
  assert rows["model.embed_dim"] == ("32", "wider embeddings for my data")
  assert rows["model.name"] == ("'din'", "a key of mian_jax.models.MODELS")
  assert rows["train.batch_size"] == ("256", "global batch, split over devices (§4.3)")


@pytest.mark.parametrize("name", ["electronics", "amazon_like"])
def test_repository_configs_load_from_another_directory(tmp_path, name):
  """electronics.py and amazon_like.py build on the Amazon defaults (mian_jax.config_defaults),
  not on a sibling module that only the repository root can import."""
  result = show_config(os.path.join(REPO, "configs", f"{name}.py"), cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  assert listed(result.stdout)["data.protocol"] == (
      "'mian'", '"mian" (§4.1, default) | "din" | "dien"')


def test_config_comments_follow_the_names_that_hold_the_config(tmp_path):
  path = tmp_path / "config.py"
  path.write_text(textwrap.dedent('''\
      import ml_collections

      from mian_jax import config_defaults


      def get_parts():
        p = ml_collections.ConfigDict()
        p.size = 3  # parts per widget
        # Two lines of comment
        # right above the key.
        p.colour = "red"
        return p


      def set_model(config):
        config.model.embed_dim = 8  # a helper that fills the config it is given


      def get_config(arg=None):
        config = config_defaults.get_base_config()
        set_model(config)
        s = config.data.mine = ml_collections.ConfigDict()
        s.seed = 0  # my seed
        s.plain = 1
        # a comment separated by a blank line belongs to nothing

        config.data.parts = get_parts()
        config.train.learning_rate = (
            0.1)  # the trailing comment of a two-line statement
        args = {"x": 1}  # not a config
        return config
      '''))
  assert cli.config_comments(str(path)) == {
      "data.mine.seed": "my seed",
      "data.parts.size": "parts per widget",
      "data.parts.colour": "Two lines of comment right above the key.",
      "train.learning_rate": "the trailing comment of a two-line statement",
      "model.embed_dim": "a helper that fills the config it is given",
  }


def test_the_movielens_folder_variable_has_one_name():
  """configs/movielens.py reads it; the README and docs name it; the real-data test skips,
  saying which variable to set, unless it is set."""
  names = {}
  for path in ("configs/movielens.py", "README.md", "docs/data.md", "tests/test_movielens.py"):
    with open(os.path.join(REPO, path)) as f:
      names[path] = set(re.findall(r"MIAN_JAX_\w+_DIR", f.read()))
  assert names == {path: {"MIAN_JAX_MOVIELENS_DIR"} for path in names}


def test_each_model_choice_is_declared_once_by_a_model_fields_type():
  """Every string-valued key of config.model but its name is a Literal-typed field of the models
  (mian_jax.models.CHOICES), with the same choices in every model that has it, and
  config_checks checks exactly those plus the train and eval choices."""
  model_config = config_defaults.get_base_config().model
  strings = {f"model.{k}" for k, v in model_config.items() if isinstance(v, str)}
  assert strings - {"model.name"} == set(models.CHOICES)
  for key, allowed in models.CHOICES.items():
    for cls in models.MODELS.values():
      assert models.literal_fields(cls).get(key.removeprefix("model."), allowed) == allowed
    assert model_config[key.removeprefix("model.")] in allowed
  assert config_checks.CHOICES.keys() - models.CHOICES.keys() == {
      "train.l2_scope", "train.optimizer", "eval.report_step"}


def test_the_defaults_comments_name_exactly_the_allowed_values():
  """The comments --show_config prints for a choice list its values; they are checked against
  the declaration, so that they cannot drift from it."""
  comments = cli.config_comments(os.path.join(REPO, "mian_jax", "config_defaults.py"))
  for key, allowed in config_checks.CHOICES.items():
    assert set(re.findall(r'"(\w+)"', comments[key])) == set(allowed), (key, comments[key])


def test_a_model_built_without_config_checks_refuses_a_bad_choice():
  """The benchmarks build models straight from a config: create_model checks the choices of
  the model's fields itself, with the same one line."""
  config = config_defaults.get_base_config()
  config.model.name, config.model.sequence_pooling = "deepfm", "max"
  with pytest.raises(ConfigError, match=r"^config\.model\.sequence_pooling='max' is not one "
                                        r"of \('mean', 'sum'\)$"):
    models.create_model(config.model, features=None)
  config.model.sequence_pooling, config.model.transformer = "sum", "postln"
  models.create_model(config.model, features=None)  # deepfm has no Transformer


CONFIG_MODULES = sorted(os.path.basename(path).removesuffix(".py")
                        for path in glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))


def default_value(path: str):
  """The default config's value of "group.key"."""
  group, key = path.split(".")
  return config_defaults.get_base_config()[group][key]


def departures_table() -> list[list[str]]:
  """The rows of docs/model.md's table "Departures from the text"."""
  with open(os.path.join(REPO, "docs", "model.md")) as f:
    text = f.read()
  section = text.split("\n## Departures from the text\n", 1)[1]
  table = section[section.index("\n|"):].split("\n\n", 1)[0]  # its first table
  return markdown_rows(table)


AMAZON_CONFIGS = ("books", "electronics", "amazon_like")


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_the_literal_reading_changes_exactly_the_listed_departures(name, monkeypatch):
  """reading=paper_literal sets every key of PAPER_LITERAL to its listed value, each different
  from the default, and changes nothing else, in every repository config."""
  monkeypatch.delenv("MIAN_JAX_MOVIELENS_DIR", raising=False)
  module = importlib.import_module(f"configs.{name}")
  default = flat_reprs(module.get_config().to_dict())
  literal = flat_reprs(module.get_config("reading=paper_literal").to_dict())
  departures = {**config_defaults.PAPER_LITERAL,
                **(config_defaults.AMAZON_LITERAL if name in AMAZON_CONFIGS else {})}
  assert literal == {**default, **{k: repr(v) for k, v in departures.items()}}
  assert {k for k in default if default[k] != literal[k]} == set(departures)


def test_docs_list_exactly_the_departures_with_their_default_and_literal_values():
  """docs/model.md's table has one row per key of PAPER_LITERAL, in its order, naming the
  default and the literal value as the config has them, so the two cannot drift."""
  rows = departures_table()
  assert [row[0] for row in rows] == [f"`{k}`" for k in config_defaults.PAPER_LITERAL]
  for row in rows:
    key = row[0].strip("`")
    assert row[1:3] == [f"`{default_value(key)}`", f"`{config_defaults.PAPER_LITERAL[key]}`"], row


def test_each_literal_ablation_variant_puts_back_one_default(monkeypatch):
  """launch/ablations.py: "paper literal" is reading=paper_literal as --config.* flags (train.*
  keys included), and "paper literal + <key>=<default>" differs from it in that key only."""
  monkeypatch.chdir(REPO)
  resolve = lambda name: flat_reprs(  # noqa: E731
      runner.resolve_config("configs/synthetic.py", ablations.VARIANTS[name]))
  literal = resolve("paper literal")
  config = importlib.import_module("configs.synthetic").get_config("reading=paper_literal")
  assert literal == flat_reprs(json.loads(json.dumps(config.to_dict())))  # tuples as lists
  for path in config_defaults.PAPER_LITERAL:
    name = f"paper literal + {path.split('.')[-1]}={default_value(path)}"
    assert resolve(name) == {**literal, path: repr(default_value(path))}, name
  # "trainable literal": the literal reading with ablations.TRAINABLE at their defaults, and
  # each other departure put back on top of it alone.
  trainable = resolve("trainable literal")
  assert trainable == {**literal, **{p: repr(default_value(p)) for p in ablations.TRAINABLE}}
  for path in set(config_defaults.PAPER_LITERAL) - set(ablations.TRAINABLE):
    name = f"trainable literal + {path.split('.')[-1]}={default_value(path)}"
    assert resolve(name) == {**trainable, path: repr(default_value(path))}, name


def test_ablation_variants_split_on_commas_and_name_an_unknown_one():
  assert not [name for name in ablations.VARIANTS if "," in name]
  assert ablations.parse_variants("paper literal, paper literal + l2_scope=batch_embeddings") == [
      "paper literal", "paper literal + l2_scope=batch_embeddings"]
  with pytest.raises(runner.LaunchError, match=r"^unknown variants \['paper literl'\]; choose "
                                               r"from \[[^\n]*\]$"):
    ablations.parse_variants("mian,paper literl")


if __name__ == "__main__":  # records the values anew: python -m tests.test_configs
  os.environ.pop("MIAN_JAX_MOVIELENS_DIR", None)
  with open(VALUES, "w") as f:
    json.dump({case: config_values(case) for case in RECORDED}, f, indent=1)
  print(f"wrote {VALUES}")
