"""Checks of config values that types alone cannot catch; each failure is one line."""

from __future__ import annotations

import filecmp
import functools
import json
import operator
import os

from flax import traverse_util
from ml_collections import ConfigDict

from mian_jax import models, optim, steps
from mian_jax.errors import ConfigError, check_choice
from mian_jax.models import MODELS

# The step whose metrics a run reports (read by train.select_reported_state).
REPORT_STEPS = ("best", "last")
# key -> allowed values of every string-valued choice in the configs.
CHOICES = {**models.CHOICES, "train.l2_scope": steps.L2_SCOPES,
           "train.optimizer": optim.OPTIMIZERS, "eval.report_step": REPORT_STEPS}
POSITIVE = ("model.embed_dim", "model.num_heads", "model.ffn_dim_multiplier", "model.gim_dim",
            "model.gru_dim", "train.batch_size", "train.learning_rate",
            "train.log_every_steps", "eval.batch_size", "checkpoint.every_steps",
            "checkpoint.max_to_keep", "data.max_seq_len")
NON_NEGATIVE = ("train.l2_weight", "train.num_epochs", "train.warmup_steps",
                "train.grad_clip_norm", "train.early_stopping_patience",
                "train.eval_every_steps", "train.eval_every_epochs",
                "eval.periodic_valid_examples", "model.cross_layers", "model.aux_loss_weight")
# config.sharding key -> its least value; each an integer.
SHARDING_MINIMUM = {"model": 1, "row_multiple": 1, "row_shard_min_rows": 0}
DIMS = ("model.mlp_dims", "model.cin_layer_sizes", "model.attention_mlp_dims",
        "model.aux_mlp_dims")


def _get(config: ConfigDict, dotted: str):
  return functools.reduce(operator.getitem, dotted.split("."), config)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError for the first out-of-range or inconsistent value."""
  if config.model.name not in MODELS:
    raise ConfigError(f"config.model.name={config.model.name!r} is not one of {sorted(MODELS)}")
  for key, allowed in CHOICES.items():
    check_choice(key, _get(config, key), allowed)
  for keys, sign, fails in ((POSITIVE, ">", operator.le), (NON_NEGATIVE, ">=", operator.lt)):
    for key in keys:
      if fails(_get(config, key), 0):
        raise ConfigError(f"config.{key} must be {sign} 0, got {_get(config, key)!r}")
  train = config.train
  if (train.eval_every_steps > 0) == (train.eval_every_epochs > 0):
    raise ConfigError(f"config.train.eval_every_steps={train.eval_every_steps} and "
                      f"train.eval_every_epochs={train.eval_every_epochs:g}: set exactly one of "
                      "them > 0 (validation every that many steps or that fraction of an epoch), "
                      "the other to 0")
  for key, value in traverse_util.flatten_dict(config.to_dict(), sep=".").items():
    if key.rsplit(".", 1)[-1] == "seed" and (not _is_int(value) or value < 0):  # numpy, JAX
      raise ConfigError(f"config.{key} must be an integer >= 0, got {value!r}")
  if not 0.0 <= config.model.dropout_rate < 1.0:
    raise ConfigError("config.model.dropout_rate must be in [0, 1), got "
                      f"{config.model.dropout_rate}")
  for key in DIMS:
    if not all(_is_int(d) and d > 0 for d in _get(config, key)):
      raise ConfigError(f"config.{key} must be positive integers, e.g. (32, 8), got "
                        f"{_get(config, key)!r}")
  if config.train.optimizer == "lazy_adam" and config.train.l2_scope == "all_weights":
    raise ConfigError("config.train.optimizer='lazy_adam' updates only the embedding rows a batch "
                      "uses, so it cannot take config.train.l2_scope='all_weights' (use "
                      "'batch_embeddings' or optimizer='adam')")
  for key, least in SHARDING_MINIMUM.items():
    value = config.sharding[key]
    if not _is_int(value) or value < least:
      raise ConfigError(f"config.sharding.{key} must be an integer >= {least}, got {value!r}")
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
  return names[0] == names[1] and all(
      filecmp.cmp(os.path.join(dirs[0], n), os.path.join(dirs[1], n), shallow=False)
      for n in names[0])


def check_validation_split(config: ConfigDict, data_dir: str) -> None:
  """ConfigError if the run would select its reported step, or its stop, on the test split."""
  selecting = [f"config.{key}={_get(config, key)!r}"
               for key, uses in (("eval.report_step", lambda v: v == "best"),
                                 ("train.early_stopping_patience", lambda v: v > 0))
               if uses(_get(config, key))]
  if selecting and valid_is_test(data_dir):
    raise ConfigError(f"the validation split is the test split in {data_dir}, so "
                      f"{' and '.join(selecting)} would select on test; set "
                      "eval.report_step=last and train.early_stopping_patience=0, or prepare a "
                      "separate validation split")
