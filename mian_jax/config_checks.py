"""Checks of config values that types alone cannot catch; each failure is one line."""

from __future__ import annotations

import filecmp
import json
import operator
import os

from flax import traverse_util
from ml_collections import ConfigDict

from mian_jax import models, optim, steps
from mian_jax.errors import ConfigError, check_choice

# key -> allowed values of every string-valued choice in the configs.
CHOICES = {**models.CHOICES, "train.l2_scope": steps.L2_SCOPES,
           "train.optimizer": optim.OPTIMIZERS, "eval.report_step": ("best", "last")}
POSITIVE = ("model.embed_dim", "model.num_heads", "model.ffn_dim_multiplier", "model.gim_dim",
            "model.gru_dim", "train.batch_size", "train.learning_rate",
            "train.log_every_steps", "eval.batch_size", "checkpoint.every_steps",
            "checkpoint.max_to_keep", "data.max_seq_len")
NON_NEGATIVE = ("train.l2_weight", "train.num_epochs", "train.warmup_steps",
                "train.grad_clip_norm", "train.early_stopping_patience",
                "train.eval_every_steps", "train.eval_every_epochs",
                "eval.periodic_valid_examples", "model.cross_layers", "model.aux_loss_weight")
# key -> the least value of a key that must be an integer; so must every `seed` (numpy, JAX).
INTEGERS = {"sharding.model": 1, "sharding.row_multiple": 1, "sharding.row_shard_min_rows": 0}
DIMS = ("model.mlp_dims", "model.cin_layer_sizes", "model.attention_mlp_dims",
        "model.aux_mlp_dims")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError for the first out-of-range or inconsistent value."""
  check_choice("model.name", config.model.name, tuple(sorted(models.MODELS)))
  for key, allowed in CHOICES.items():
    check_choice(key, config[key], allowed)
  for keys, sign, fails in ((POSITIVE, ">", operator.le), (NON_NEGATIVE, ">=", operator.lt)):
    for key in keys:
      if fails(config[key], 0):
        raise ConfigError(f"config.{key} must be {sign} 0, got {config[key]!r}")
  train = config.train
  if (train.eval_every_steps > 0) == (train.eval_every_epochs > 0):
    raise ConfigError(f"config.train.eval_every_steps={train.eval_every_steps} and "
                      f"train.eval_every_epochs={train.eval_every_epochs:g}: set exactly one of "
                      "them > 0 (validation every that many steps or that fraction of an epoch), "
                      "the other to 0")
  seeds = [k for k in traverse_util.flatten_dict(config.to_dict(), sep=".")
           if k.rsplit(".", 1)[-1] == "seed"]
  for key, least in {**dict.fromkeys(seeds, 0), **INTEGERS}.items():
    if not _is_int(config[key]) or config[key] < least:
      raise ConfigError(f"config.{key} must be an integer >= {least}, got {config[key]!r}")
  if not 0.0 <= config.model.dropout_rate < 1.0:
    raise ConfigError("config.model.dropout_rate must be in [0, 1), got "
                      f"{config.model.dropout_rate}")
  for key in DIMS:
    if not all(_is_int(d) and d > 0 for d in config[key]):
      raise ConfigError(f"config.{key} must be positive integers, e.g. (32, 8), got "
                        f"{config[key]!r}")
  if train.optimizer == "lazy_adam" and train.l2_scope == "all_weights":
    raise ConfigError("config.train.optimizer='lazy_adam' updates only the embedding rows a batch "
                      "uses, so it cannot take config.train.l2_scope='all_weights' (use "
                      "'batch_embeddings' or optimizer='adam')")
  if train.num_train_steps != -1 and train.num_train_steps <= 0:
    raise ConfigError("config.train.num_train_steps must be -1 (use num_epochs) or > 0, got "
                      f"{train.num_train_steps}")
  if train.num_train_steps == -1 and train.num_epochs <= 0:
    raise ConfigError("config.train.num_epochs must be > 0 when train.num_train_steps=-1")
  for key in ("train.batch_size", "eval.batch_size"):
    if config[key] % num_devices:
      raise ConfigError(f"config.{key}={config[key]} must be divisible by the "
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
  valid, test = (os.path.join(data_dir, split) for split in ("valid", "test"))
  names = sorted(os.listdir(valid))
  return names == sorted(os.listdir(test)) and all(
      filecmp.cmp(os.path.join(valid, n), os.path.join(test, n), shallow=False) for n in names)


def check_validation_split(config: ConfigDict, data_dir: str) -> None:
  """ConfigError if the run would select its reported step, or its stop, on the test split."""
  selecting = [f"config.{key}={config[key]!r}"
               for key, uses in (("eval.report_step", lambda v: v == "best"),
                                 ("train.early_stopping_patience", lambda v: v > 0))
               if uses(config[key])]
  if selecting and valid_is_test(data_dir):
    raise ConfigError(f"the validation split is the test split in {data_dir}, so "
                      f"{' and '.join(selecting)} would select on test; set "
                      "eval.report_step=last and train.early_stopping_patience=0, or prepare a "
                      "separate validation split")
