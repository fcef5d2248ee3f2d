"""What a workdir records about its run, and how a rerun is checked against it.

A workdir holds one run. `<workdir>/config.json` records the config it runs with, and every
checkpoint's meta records the data it trained on (`data_identity`). A rerun on the same workdir
resumes that run, so its config must mean the same run: keys that change the parameter tree,
the optimiser, the data or the meaning of a checkpoint must be equal (`check_rerun`); only the
keys in `RESUMABLE_KEYS` (step budget, logging and evaluation cadence, where files lie) may
differ. Commands given a `--workdir` but no `--config` take the recorded config
(`with_recorded_config`), so `evaluate`, a resume and later tools need no flags repeated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from mian_jax.errors import ConfigError

CONFIG_FILE = "config.json"
# The config file that returns a workdir's recorded config (`--config=<it>:<workdir>`).
RECORDED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded_config.py")

# Keys a rerun may change: how long to train, how often to log, evaluate and save, how to
# report, and where the (checksummed, so still verified) data files lie.
RESUMABLE_KEYS = frozenset({
    "train.num_train_steps", "train.num_epochs", "train.log_every_steps",
    "train.eval_every_steps", "train.eval_every_epochs", "train.early_stopping_patience",
    "train.max_bce",
    "checkpoint.every_steps",
    "checkpoint.max_to_keep", "eval.batch_size", "eval.report_step", "eval.final_test",
    "data.raw_dir",
    "data.prepared_dir", "data.tabular.path", "data.tabular.train_path",
    "data.tabular.valid_path", "data.tabular.test_path",
    "sharding.model",  # the mesh's shape: where rows live, not what is computed
})


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def check_workdir_path(workdir: str) -> None:
  """Raises ConfigError if `workdir` exists but is not a directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory "
                      "(it is created if missing)")


def read_recorded_config(workdir: str) -> dict[str, Any] | None:
  """The JSON config a workdir records, or None if it has none."""
  path = config_path(workdir)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {e}); restore it or use "
                      "another --workdir") from None


def has_trained_state(workdir: str) -> bool:
  """Whether a workdir holds anything a changed config would invalidate: checkpoints or
  evaluation results."""
  for name in ("checkpoints", "checkpoints_best", "eval"):
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and os.listdir(path):
      return True
  return False


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _comparable(value):
  """JSON has no tuples: compare lists and tuples alike."""
  if isinstance(value, (list, tuple)):
    return [_comparable(v) for v in value]
  return value


def identity_differences(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
  """"key: recorded -> requested" for each differing key outside RESUMABLE_KEYS."""
  a, b = flatten(recorded), flatten(requested)
  missing = "(absent)"
  return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
          for k in sorted(set(a) | set(b))
          if k not in RESUMABLE_KEYS
          and _comparable(a.get(k, missing)) != _comparable(b.get(k, missing))]


def check_rerun(workdir: str, requested: dict[str, Any]) -> None:
  """Raises ConfigError (one line, naming the keys) if `workdir` holds a trained run whose
  recorded config differs from `requested` in a key that is not resumable. Moves nothing."""
  recorded = read_recorded_config(workdir)
  if recorded is None or not has_trained_state(workdir):
    return
  differences = identity_differences(recorded, requested)
  if differences:
    shown = "; ".join(differences[:5])
    more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
    raise ConfigError(
        f"{workdir} holds a run started with another config ({shown}{more}); to resume it, "
        "rerun without --config (its config.json is used), or use another --workdir")


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=v` or `--name v` in argv (the last one given), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def with_recorded_config(argv: list[str]) -> list[str]:
  """argv with `--config=<RECORDED_CONFIG>:<workdir>` added when it names a --workdir that
  records a config and gives no --config; otherwise argv unchanged.

  `--config.<key>=<value>` overrides then apply to the recorded config, and are checked
  against it like any rerun.
  """
  if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
    return argv
  workdir = _flag_value(argv[1:], "workdir")
  if not workdir or not os.path.isfile(config_path(workdir)):
    return argv
  return [argv[0], f"--config={RECORDED_CONFIG}:{os.path.abspath(workdir)}", *argv[1:]]
