"""Errors a user can cause and fix; entry points print them as one line."""

import signal


class MianError(Exception):
  """Base class: bad input that the user can fix (config, data, paths)."""


class ConfigError(MianError, ValueError):
  """A config value that is out of range or inconsistent with the data."""


def check_choice(key: str, value, allowed: tuple) -> None:
  """Raises ConfigError, in the one line the CLI prints, unless `value` is one of `allowed`;
  `key` is the dotted config key ("model.transformer")."""
  if value not in allowed:
    raise ConfigError(f"config.{key}={value!r} is not one of {allowed}")


class DataError(MianError, ValueError):
  """Missing, malformed or inconsistent prepared data."""


class NonFiniteLossError(MianError, FloatingPointError):
  """Training produced a NaN or infinite loss; the run was stopped."""


class NonFiniteStateError(NonFiniteLossError):
  """The train state to be saved held NaN or infinite values; it was not saved."""


class WorkdirBusyError(MianError):
  """Another run holds the workdir's lock."""


class Preempted(Exception):
  """SIGTERM or SIGINT stopped training after a checkpoint at `step`; a rerun resumes there.
  Not a MianError: nothing is wrong with the input, and the exit status says it was a signal."""

  def __init__(self, signum: int, step: int, workdir: str):
    self.signum, self.step, self.workdir = signum, step, workdir
    name = signal.Signals(signum).name
    super().__init__(f"stopped by {name} at step {step} after saving a checkpoint; rerun the "
                     f"same command to resume (workdir {workdir})")
