"""Plausible Unix times in seconds, for the sources that turn timestamps into calendar features:
one outside [1970-01-01, 2100-01-01) is a bad row, whose reason says when it looks like another
unit (docs/data.md)."""

from __future__ import annotations

import numpy as np

MIN_SECONDS = 0  # 1970-01-01 00:00 UTC
MAX_SECONDS = 4_102_444_800  # 2100-01-01 00:00 UTC (exclusive)
RANGE_TEXT = "Unix seconds in 1970..2099"
_UNITS = ((10**3, "milliseconds"), (10**6, "microseconds"), (10**9, "nanoseconds"))


def plausible(seconds: np.ndarray) -> np.ndarray:
  """[N] bool: True where the value is a Unix time in seconds between 1970 and 2099."""
  seconds = np.asarray(seconds)
  return (seconds >= MIN_SECONDS) & (seconds < MAX_SECONDS)


def unit_hint(value) -> str:
  """"" or e.g. "; it looks like milliseconds (divide by 1000)" for an implausible value."""
  for factor, unit in _UNITS:
    if MAX_SECONDS <= value < MAX_SECONDS * factor:
      return f"; it looks like {unit} (divide by {factor})"
  return "; it is negative" if value < 0 else ""


def describe(value, name: str = "timestamp") -> str:
  """Why `value` is rejected: "<name> <value> is not Unix seconds in 1970..2099" + `unit_hint`."""
  return f"{name} {value} is not {RANGE_TEXT}{unit_hint(value)}"
