"""Checks of config values that types alone cannot catch; each failure is one line."""

from __future__ import annotations

import filecmp
import json
import os

from ml_collections import ConfigDict

from mian_jax import models, optim, steps
from mian_jax.errors import ConfigError, check_choice
from mian_jax.models import MODELS

# The step whose metrics a run reports (read by train.select_reported_state).
REPORT_STEPS = ("best", "last")
# key -> allowed values, for every string-valued choice in the configs: the models' (the Literal
# types of their fields, mian_jax.models.CHOICES), the optimiser's (optim.OPTIMIZERS), the L2
# term's (steps.L2_SCOPES) and the reported step's.
CHOICES = {
    **models.CHOICES,
    "train.l2_scope": steps.L2_SCOPES,
    "train.optimizer": optim.OPTIMIZERS,
    "eval.report_step": REPORT_STEPS,
}
POSITIVE = ("model.embed_dim", "model.num_heads", "model.ffn_dim_multiplier", "model.gim_dim",
            "train.batch_size", "train.learning_rate", "train.log_every_steps",
            "eval.batch_size", "checkpoint.every_steps",
            "checkpoint.max_to_keep", "data.max_seq_len")
NON_NEGATIVE = ("train.l2_weight", "train.num_epochs", "train.warmup_steps",
                "train.grad_clip_norm", "train.early_stopping_patience",
                "train.eval_every_steps")
# Keys added after runs were recorded without them: checked when present.
NON_NEGATIVE_IF_PRESENT = ("train.eval_every_epochs", "eval.periodic_valid_examples")
# config.sharding (absent from configs saved before it existed)
SHARDING_POSITIVE = ("model", "row_multiple")
SHARDING_NON_NEGATIVE = ("row_shard_min_rows",)
# The baselines' keys (docs/baselines.md), checked when present (older saved configs lack them).
BASELINE_POSITIVE = ("gru_dim",)
BASELINE_NON_NEGATIVE = ("cross_layers", "aux_loss_weight")


def _get(config: ConfigDict, dotted: str):
  node = config
  for key in dotted.split("."):
    node = node[key]
  return node


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _seeds(config: ConfigDict, prefix: str = ""):
  """(dotted key, value) of every key named `seed`, at any depth."""
  for key, value in config.items():
    if isinstance(value, ConfigDict):
      yield from _seeds(value, f"{prefix}{key}.")
    elif key == "seed":
      yield f"{prefix}{key}", value


def check_config(config: ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError for the first out-of-range or inconsistent value."""
  if config.model.name not in MODELS:
    raise ConfigError(f"config.model.name={config.model.name!r} is not one of {sorted(MODELS)}")
  for key, allowed in CHOICES.items():
    if key.split(".")[1] in config[key.split(".")[0]]:
      check_choice(key, _get(config, key), allowed)
  for key in POSITIVE:
    if _get(config, key) <= 0:
      raise ConfigError(f"config.{key} must be > 0, got {_get(config, key)!r}")
  for key in NON_NEGATIVE:
    if _get(config, key) < 0:
      raise ConfigError(f"config.{key} must be >= 0, got {_get(config, key)!r}")
  for key in NON_NEGATIVE_IF_PRESENT:
    group, name = key.split(".")
    if config[group].get(name, 0) < 0:
      raise ConfigError(f"config.{key} must be >= 0, got {config[group][name]!r}")
  check_validation_cadence(config.train)
  for key, value in _seeds(config):  # numpy and JAX take only non-negative seeds
    if not _is_int(value) or value < 0:
      raise ConfigError(f"config.{key} must be an integer >= 0, got {value!r}")
  if not 0.0 <= config.model.dropout_rate < 1.0:
    raise ConfigError("config.model.dropout_rate must be in [0, 1), got "
                      f"{config.model.dropout_rate}")
  for key in BASELINE_POSITIVE:
    if key in config.model and config.model[key] <= 0:
      raise ConfigError(f"config.model.{key} must be > 0, got {config.model[key]!r}")
  for key in BASELINE_NON_NEGATIVE:
    if key in config.model and config.model[key] < 0:
      raise ConfigError(f"config.model.{key} must be >= 0, got {config.model[key]!r}")
  for key in ("mlp_dims", "cin_layer_sizes", "attention_mlp_dims", "aux_mlp_dims"):
    if key in config.model and not all(_is_int(d) and d > 0 for d in config.model[key]):
      raise ConfigError(f"config.model.{key} must be positive integers, e.g. (32, 8), got "
                        f"{config.model[key]!r}")
  if config.train.get("optimizer") == "lazy_adam" and config.train.l2_scope == "all_weights":
    raise ConfigError("config.train.optimizer='lazy_adam' updates only the embedding rows a batch "
                      "uses, so it cannot take config.train.l2_scope='all_weights' (use "
                      "'batch_embeddings' or optimizer='adam')")
  for key in SHARDING_POSITIVE + SHARDING_NON_NEGATIVE:
    value = config.get("sharding", {}).get(key)
    if value is not None and (not _is_int(value) or value < (key in SHARDING_POSITIVE)):
      raise ConfigError(f"config.sharding.{key} must be an integer >= "
                        f"{int(key in SHARDING_POSITIVE)}, got {value!r}")
  num_steps = config.train.num_train_steps
  if num_steps != -1 and num_steps <= 0:
    raise ConfigError("config.train.num_train_steps must be -1 (use num_epochs) or > 0, got "
                      f"{num_steps}")
  if num_steps == -1 and config.train.num_epochs <= 0:
    raise ConfigError("config.train.num_epochs must be > 0 when train.num_train_steps=-1")
  for key in ("train.batch_size", "eval.batch_size"):
    if _get(config, key) % num_devices:
      raise ConfigError(f"config.{key}={_get(config, key)} must be divisible by the "
                        f"{num_devices} devices (the global batch is split over them)")


def check_validation_cadence(train: ConfigDict) -> None:
  """Raises ConfigError unless exactly one of train.eval_every_steps and
  train.eval_every_epochs (absent: 0) is > 0."""
  every_steps, every_epochs = train.eval_every_steps, train.get("eval_every_epochs", 0.0)
  if (every_steps > 0) != (every_epochs > 0):
    return
  given = (f"train.eval_every_steps={every_steps} and train.eval_every_epochs={every_epochs:g}")
  raise ConfigError(f"config.{given}: set exactly one of them > 0 (validation every that many "
                    "steps or that fraction of an epoch), the other to 0")


def valid_is_test(data_dir: str) -> bool:
  """Whether the validation split of a prepared directory is its test split: stats.json says
  so (`valid_is_test`), or valid/ and test/ hold the same column files, byte for byte."""
  try:
    with open(os.path.join(data_dir, "stats.json")) as f:
      if json.load(f).get("valid_is_test"):
        return True
  except (OSError, ValueError, AttributeError):
    pass  # a directory from elsewhere may have no (usable) stats.json: compare the files
  dirs = [os.path.join(data_dir, split) for split in ("valid", "test")]
  names = [sorted(os.listdir(d)) for d in dirs]
  if names[0] != names[1]:
    return False
  # filecmp (shallow=False) compares sizes first and stops at the first differing block.
  return all(filecmp.cmp(os.path.join(dirs[0], n), os.path.join(dirs[1], n), shallow=False)
             for n in names[0])


def check_validation_split(config: ConfigDict, data_dir: str) -> None:
  """Raises ConfigError if the run would choose its reported step, or when to stop, on the
  test split: `eval.report_step="best"` or `train.early_stopping_patience` > 0 on prepared
  data whose validation split is its test split (`valid_is_test`)."""
  selecting = [f"config.{key}={_get(config, key)!r}"
               for key, uses in (("eval.report_step", lambda v: v == "best"),
                                 ("train.early_stopping_patience", lambda v: v > 0))
               if uses(_get(config, key))]
  if selecting and valid_is_test(data_dir):
    raise ConfigError(f"the validation split is the test split in {data_dir}, so "
                      f"{' and '.join(selecting)} would select on test; set "
                      "eval.report_step=last and train.early_stopping_patience=0, or prepare a "
                      "separate validation split")
