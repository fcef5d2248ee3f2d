"""A run's workdir: its lock (`hold`), its config (`load_config`, recorded in `config.json`,
checked on a rerun: only `RESUMABLE_KEYS` may differ) and its checkpoints for evaluate, predict
and export (`restore_run`; training resumes in `train.Loop`).

The lock: process 0's `flock` on `<workdir>/.lock` (kept: deleting it would let a third run lock
a fresh file) while a run writes, since a second run's orbax manager would delete the first
one's save in flight; a second run fails at once, naming the holder written into the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from mian_jax import checkpointing, cli, config_checks, config_defaults, sharding, steps
from mian_jax.errors import ConfigError, DataError, WorkdirBusyError, first_of, one_line

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# The config file that returns a workdir's recorded config (`--config=<it>:<workdir>`).
RECORDED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded_config.py")

# Keys a rerun may change: how long to train, how often to log, evaluate and save, how to
# report, and where the (checksummed, so still verified) data files lie.
RESUMABLE_KEYS = frozenset({
    "train.num_train_steps", "train.num_epochs", "train.log_every_steps", "train.max_bce",
    "train.eval_every_steps", "train.eval_every_epochs", "train.early_stopping_patience",
    "checkpoint.every_steps", "checkpoint.max_to_keep", "eval.batch_size", "eval.report_step",
    "eval.final_test", "data.raw_dir", "data.prepared_dir", "data.tabular.path",
    "data.tabular.train_path", "data.tabular.valid_path", "data.tabular.test_path",
    "sharding.model",  # the mesh's shape: where rows live, not what is computed
})


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def check_workdir_path(workdir: str) -> None:
  """Raises ConfigError if `workdir` exists but is not a directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; pass a directory "
                      "(it is created if missing)")


def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def _try_lock(workdir: str) -> tuple[int | None, str]:
  """Process 0's attempt: (fd, "") when locked, (None, message) when another run holds the
  lock, (None, "") when the file system cannot lock."""
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(lock_path(workdir), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    os.close(fd)
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      pid, host, since, *_ = holder.split() + ["?", "?", "?"]
      return None, (f"workdir {workdir} is in use by another run (pid {pid} on host {host} "
                    f"since {since}); wait for it to finish or use another --workdir")
    logging.warning("Cannot lock %s (%s): running without a workdir lock; make sure no other "
                    "run uses %s", lock_path(workdir), e, workdir)
    return None, ""
  # The holder, one line: "pid host start-time command".
  holder = (f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')} "
            f"{os.path.basename(sys.executable)} {' '.join(sys.argv)}")
  os.ftruncate(fd, 0)
  os.pwrite(fd, (" ".join(holder.split()) + "\n").encode(), 0)
  os.fsync(fd)
  return fd, ""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """The workdir's lock (the workdir made if missing), on every process; WorkdirBusyError."""
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  fd, busy = _try_lock(workdir) if jax.process_index() == 0 else (None, "")
  busy = sharding.process_zero_verdict(  # every process of a second run stops
      busy, f"workdir {workdir} is in use by another run (see process 0's error)")
  if busy:
    raise WorkdirBusyError(busy)
  try:
    yield
  except BaseException:
    if fd is not None and created and os.listdir(workdir) == [LOCK_FILE]:
      # A run that failed before writing anything leaves no workdir it created behind.
      os.remove(lock_path(workdir))
      os.rmdir(workdir)
    raise
  finally:
    if fd is not None:
      os.ftruncate(fd, 0)  # no stale holder text for a reader that races the next holder
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)


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


def config_differences(recorded: dict[str, Any], requested: dict[str, Any],
                       ignore: frozenset[str] = frozenset()) -> list[str]:
  """"key: recorded -> requested" for each key outside `ignore` whose values differ."""
  a, b = cli.flatten(recorded), cli.flatten(requested)
  missing = "(absent)"
  return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
          for k in sorted(set(a) | set(b))
          if k not in ignore and _tuples(a.get(k, missing)) != _tuples(b.get(k, missing))]


def check_rerun(workdir: str, requested: dict[str, Any]) -> None:
  """Raises ConfigError (one line, naming the keys) if `workdir` holds a trained run whose
  recorded config differs from `requested` in a key that is not resumable. Moves nothing."""
  recorded = read_recorded_config(workdir)
  trained = [os.path.join(workdir, name) for name in ("checkpoints", "checkpoints_best", "eval")]
  if recorded is None or not any(os.path.isdir(p) and os.listdir(p) for p in trained):
    return  # nothing a changed config would invalidate
  differences = config_differences(recorded, requested, RESUMABLE_KEYS)
  if differences:
    raise ConfigError(
        f"{workdir} holds a run started with another config ({first_of(differences, 5)}); to "
        "resume it, rerun without --config (its config.json is used), or use another --workdir")


def with_recorded_config(argv: list[str]) -> list[str]:
  """argv with `--config=<RECORDED_CONFIG>:<workdir>` added when it names a --workdir that
  records a config and gives no --config (overrides then apply to the recorded config)."""
  workdir = cli.flag_value(argv[1:], "workdir")
  if (cli.flag_value(argv[1:], "config") is not None or not workdir
      or not os.path.isfile(config_path(workdir))):
    return argv
  return [argv[0], f"--config={RECORDED_CONFIG}:{os.path.abspath(workdir)}", *argv[1:]]


def _tuples(value):
  """JSON's lists as the tuples a config holds, also to compare the two alike."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def recorded_config(workdir: str) -> ConfigDict:
  """The config `workdir` records, equal to the one it ran with key for key and type for type
  (JSON's lists become the tuples the config held). DataError if there is none."""
  if not os.path.isdir(workdir):
    raise DataError(f"--workdir={workdir} does not exist")
  recorded = read_recorded_config(workdir)
  if recorded is None:
    raise DataError(f"{workdir} has no {CONFIG_FILE}: it is not a training workdir")
  expected = cli.flatten(config_defaults.get_base_config().to_dict())
  missing = sorted(k for k in set(expected) - set(cli.flatten(recorded))
                   if not k.startswith("data."))  # the data keys depend on the source
  if missing:
    raise DataError(f"{config_path(workdir)} lacks {', '.join(missing)}: it was recorded by an "
                    "older version; add them with the values that run used, or retrain")
  return ConfigDict(_tuples(recorded))


def load_config(config: str | ConfigDict, overrides: Sequence[str] = ()) -> ConfigDict:
  """A config file ("configs/<x>.py[:arg]") or ConfigDict with `--config.<key>=<value>` overrides
  applied as `python -m mian_jax.main` does (locked), then checked (`config_checks`). ConfigError
  (one line) for a flag that is no override, a bad key or value, a file that does not load."""
  for flag in overrides:
    if not flag.startswith("--config.") or "=" not in flag:
      raise ConfigError(f"{flag!r} is not a config override (--config.<key>=<value>)")
  is_file = isinstance(config, str)
  argv = ["load_config", *([f"--config={config}"] if is_file else []), *overrides]
  flag_values = flags.FlagValues()
  try:
    if is_file:
      config_flags.DEFINE_config_file("config", None, flag_values=flag_values,
                                      lock_config=True, sys_argv=argv)
    else:
      config_flags.DEFINE_config_dict("config", config.copy_and_resolve_references(),
                                      flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
  except (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError,
          SyntaxError) as e:
    while isinstance(e, AttributeError) and e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]  # ml_collections wraps a missing key's KeyError
    prefix = "unknown config key " if isinstance(e, KeyError) else ""
    raise ConfigError(prefix + one_line(e)) from None
  config_checks.check_config(flag_values.config)
  return flag_values.config


def parse_step(text: str) -> int | str:
  """"latest", "best" or a step number (an int)."""
  if text in ("latest", "best"):
    return text
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f"--step={text!r}: expected latest, best or a step number") from None


def restore_run(workdir: str, step: int | str = "latest", config: ConfigDict | None = None):
  """(steps.Run, TrainState, meta) of checkpoint `step` ("latest", "best" or a number) of the run
  in `workdir`, with its recorded config or `config` (ConfigError if another run's); DataError
  for no readable checkpoint or one trained on other data."""
  config = recorded_config(workdir) if config is None else config
  config_checks.check_config(config, jax.device_count())
  check_workdir_path(workdir)
  check_rerun(workdir, config.to_dict())
  best = step == "best"
  directory = checkpointing.checkpoint_dir(workdir, best)
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise DataError(f"no checkpoints in {workdir} (expected {directory})")
  run = steps.setup(config)
  manager = checkpointing.create_manager(workdir, config.checkpoint, read_only=True, best=best)
  restored = checkpointing.restore(manager, run.state, step if isinstance(step, int) else None,
                                   identity=checkpointing.identity(run))
  manager.close()
  if restored is None:
    raise DataError(f"no readable checkpoint in {directory}")
  return run, *restored
