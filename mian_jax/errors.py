"""Errors a user can cause and fix; entry points print them as one line."""


class MianError(Exception):
  """Base class: bad input that the user can fix (config, data, paths)."""


class ConfigError(MianError, ValueError):
  """A config value that is out of range or inconsistent with the data."""


class DataError(MianError, ValueError):
  """Missing, malformed or inconsistent prepared data."""


class NonFiniteLossError(MianError, FloatingPointError):
  """Training produced a NaN or infinite loss; the run was stopped."""
