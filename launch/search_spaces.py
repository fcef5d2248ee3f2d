"""The search space of every model for launch/sweep.py, declared in one place.

A space maps a config key to a dimension: `LogFloat(low, high)` (log-uniform) or
`Choice(values)`. Every model searches the COMMON dimensions that apply to it (a `model.<x>`
key applies when the model has a field `x`; `train.*` keys always do) plus its own SPECIFIC
ones; docs/experiments.md, "The search", shows the table (`markdown_table`). Two rules keep a
search honest against the defaults:

- a key set by hand (a variant's overrides, or the overrides after `--`) is not searched;
- a dimension always contains the config's own value (added to a Choice, or the LogFloat
  widened), since the first trial of every study is the config's defaults.

`train.num_epochs` is not searched when the config caps the steps (`train.num_train_steps`);
every trial stops after EARLY_STOPPING_PATIENCE validations without a better AUC, so a long
budget costs little once a run stops improving. `--space=grid` replaces all of this by a grid
(`parse_grid`), searched exhaustively.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

from mian_jax.errors import ConfigError
from mian_jax.models import MODELS, literal_fields

# Validations without a better AUC after which a trial's run stops (train.early_stopping_patience).
EARLY_STOPPING_PATIENCE = 3


@dataclasses.dataclass(frozen=True)
class LogFloat:
  """A float drawn log-uniformly from [low, high]."""
  low: float
  high: float

  def text(self) -> str:
    return f"{self.low:g} .. {self.high:g} (log)"


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `values` (tuples, e.g. MLP sizes, are searched as their override text)."""
  values: tuple

  def text(self) -> str:
    return ", ".join(value_text(v) for v in self.values)


Dimension = LogFloat | Choice

# Reference MLP sizes: MIAN §4.3 (32, 8); DIN's and DIEN's code (200, 80); DeepFM's paper
# (400, 400, 400); Wide&Deep's (1024, 512, 256); and one small step up, (64, 32).
MLP_DIMS = ((32, 8), (64, 32), (200, 80), (400, 400, 400), (1024, 512, 256))

COMMON: dict[str, Dimension] = {
    "train.learning_rate": LogFloat(1e-4, 1e-2),
    "model.embed_dim": Choice((8, 16, 32)),
    "model.mlp_dims": Choice(MLP_DIMS),
    "model.dropout_rate": Choice((0.0, 0.1, 0.2, 0.3, 0.5)),
    "train.l2_weight": Choice((0.0, 1e-5, 1e-4, 1e-3, 1e-2)),
    "train.num_epochs": Choice((1.0, 2.0, 3.0)),
}

_POOLING = {"model.sequence_pooling": Choice(("mean", "sum"))}
SPECIFIC: dict[str, dict[str, Dimension]] = {
    "mian": {"model.gim_dim": Choice((32, 64, 128)), "model.num_heads": Choice((1, 2, 4, 8)),
             "model.ibim_score": Choice(("additive", "bilinear", "din"))},
    "lr": _POOLING,
    "wide_deep": _POOLING,
    "deepfm": _POOLING,
    "dcn": {"model.cross_layers": Choice((1, 2, 3, 4, 6)), **_POOLING},
    "xdeepfm": {"model.cin_layer_sizes": Choice(((64, 64), (100, 100, 100), (200, 200, 200))),
                **_POOLING},
    "din": {"model.attention_mlp_dims": Choice(((36,), (80, 40))),
            "model.din_attention_norm": Choice(("none", "softmax", "scaled_softmax")),
            "model.use_dice": Choice((False, True))},
    "dien": {"model.gru_dim": Choice((16, 32, 64)),
             "model.aux_loss_weight": Choice((0.1, 0.5, 1.0))},
}


def value_text(value) -> str:
  """A config value as an override types it: (200, 80) -> "(200,80)", (36,) -> "(36,)"."""
  if isinstance(value, (tuple, list)):
    inner = ",".join(value_text(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  return str(value)


def param_value(value):
  """A config value as an Optuna parameter: tuples as their override text, the rest as is."""
  return value_text(value) if isinstance(value, (tuple, list)) else value


def model_fields(model: str) -> set[str]:
  return {f.name for f in dataclasses.fields(MODELS[model])}


def declared(model: str) -> dict[str, Dimension]:
  """The dimensions declared for `model` (COMMON that apply, then SPECIFIC), before the rules
  of the module docstring."""
  fields = model_fields(model)
  space = {k: d for k, d in COMMON.items()
           if not k.startswith("model.") or k.removeprefix("model.") in fields}
  space.update(SPECIFIC[model])
  missing = [k for k in space if k.startswith("model.") and k[6:] not in fields]
  if missing:
    raise ConfigError(f"search space of {model} names {missing}, which {model} does not have")
  choices = {k: set(v) for k, v in (("model." + n, a) for n, a in
                                    literal_fields(MODELS[model]).items())}
  for key, dim in space.items():  # a string choice the model refuses fails here, not mid-search
    if key in choices and isinstance(dim, Choice) and not set(dim.values) <= choices[key]:
      raise ConfigError(f"search space of {model}: {key} {dim.values} not in {choices[key]}")
  return space


def space_for(model: str, defaults: Mapping[str, object], pinned: set[str]) -> dict:
  """The space a study of `model` searches, given the resolved config `defaults` (flat,
  "group.key" -> value) and the keys set by hand (`pinned`)."""
  space = {}
  for key, dim in declared(model).items():
    if key in pinned or (key == "train.num_epochs" and defaults["train.num_train_steps"] > 0):
      continue
    default = defaults[key]
    if isinstance(dim, LogFloat):
      space[key] = LogFloat(min(dim.low, default), max(dim.high, default))
    else:
      known = [param_value(v) for v in dim.values]
      space[key] = dim if param_value(default) in known else Choice((*dim.values, default))
  return space


def default_params(space: Mapping[str, Dimension], defaults: Mapping[str, object]) -> dict:
  """The config's own values as parameters of `space` (the first trial of a study)."""
  return {key: param_value(defaults[key]) for key in space}


def suggest(trial, space: Mapping[str, Dimension]) -> dict:
  """Draws every dimension of `space` from an Optuna trial; returns {key: parameter}."""
  params = {}
  for key, dim in space.items():
    if isinstance(dim, LogFloat):
      params[key] = trial.suggest_float(key, dim.low, dim.high, log=True)
    else:
      params[key] = trial.suggest_categorical(key, [param_value(v) for v in dim.values])
  return params


def overrides(params: Mapping[str, object]) -> list[str]:
  """The --config flags of a trial's parameters, in key order."""
  return [f"--config.{key}={value_text(value)}" for key, value in sorted(params.items())]


# ----------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
  """Splits on commas outside brackets: "1e-3,(8,4)" -> ["1e-3", "(8,4)"]."""
  values, depth, current = [], 0, ""
  for char in text:
    depth += (char in "([{") - (char in ")]}")
    if char == "," and depth == 0:
      values.append(current.strip())
      current = ""
    else:
      current += char
  values.append(current.strip())
  return [v for v in values if v]


def parse_grid(text: str) -> dict[str, Choice]:
  """"a.b=1,2;c.d=x,y" -> {"a.b": Choice(("1", "2")), "c.d": Choice(("x", "y"))}, each value
  kept as typed (an override text). Raises ConfigError on a malformed group."""
  grid = {}
  for group in filter(None, (g.strip() for g in text.split(";"))):
    key, sep, values = group.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key or not split_values(values):
      raise ConfigError(f"grid group {group!r}: expected key=value1,value2,...")
    if key in grid:
      raise ConfigError(f"grid key {key} appears twice")
    grid[key] = Choice(tuple(split_values(values)))
  if not grid:
    raise ConfigError("--space=grid needs --grid='key=v1,v2;key2=w1,w2'")
  return grid


def grid_size(grid: Mapping[str, Choice]) -> int:
  return len(list(itertools.product(*(d.values for d in grid.values()))))


# ----------------------------------------------------------------------------- the table


def markdown_table(models: Sequence[str] = tuple(MODELS)) -> str:
  """Every model's declared dimensions (docs/experiments.md, "The search"): one row per
  dimension with the models that search it, then the count per model."""
  spaces = {m: declared(m) for m in models}
  rows: dict[tuple[str, str], list[str]] = {}
  for model in models:
    for key, dim in spaces[model].items():
      rows.setdefault((key, dim.text()), []).append(model)
  lines = ["| dimension | values | models |", "|---|---|---|"]
  lines += [f"| `{key}` | {text} | {'all' if len(users) == len(models) else ', '.join(users)} |"
            for (key, text), users in rows.items()]
  counts = ", ".join(f"{m} {len(spaces[m])}" for m in models)
  return "\n".join(lines) + f"\n\nDimensions per model: {counts}.\n"
