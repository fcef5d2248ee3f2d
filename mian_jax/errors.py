"""Errors a user can cause and fix; entry points print them as one line."""

import errno
import os
import re
import signal
import sys
from typing import NoReturn


class MianError(Exception):
  """Base class: bad input that the user can fix (config, data, paths)."""


class ConfigError(MianError, ValueError):
  """A config value that is out of range or inconsistent with the data."""


def check_choice(key: str, value, allowed: tuple) -> None:
  """ConfigError, the one line the CLI prints, unless `value` (of config key `key`) is allowed."""
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
    self.signum = signum
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after saving a "
                     f"checkpoint; rerun the same command to resume (workdir {workdir})")


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_ERRNO_IN_TEXT = re.compile(r"os_error_code='(\d+)'")  # tensorstore's ValueError text


def file_system_error(e: BaseException | None) -> OSError | None:
  """The OSError of a full disk or an unwritable path that `e` is or was raised from (wrapped by
  orbax or pyarrow, or said in tensorstore's ValueError text), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_FULL + _NOT_WRITABLE:
      return e
    match = _ERRNO_IN_TEXT.search(str(e))
    if match and (code := int(match.group(1))) in _DISK_FULL + _NOT_WRITABLE:
      return OSError(code, os.strerror(code))
    e = e.__cause__ or e.__context__
  return None


def file_system_message(e: OSError) -> str:
  """One line for a file-system error a user fixes outside the program (`file_system_error`)."""
  where = f" {e.filename}" if e.filename else ""
  reason = e.strerror or errno.errorcode.get(e.errno, str(e.errno))
  if e.errno in _DISK_FULL:
    return (f"disk full: cannot write{where} ({reason}); free space on that file system and "
            "rerun the same command (training resumes from its last complete checkpoint)")
  if e.errno == errno.EROFS:
    return (f"cannot write{where}: read-only file system; use a writable --workdir (or "
            "--output)")
  return f"cannot write{where} ({reason}); make it writable or choose another path"


def one_line(e: BaseException) -> str:
  """The message of `e` on one line (KeyError's repr quoting removed)."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  return " ".join(text.split())


def usage_error(message: str) -> NoReturn:
  """Exits with `error: <message>` on one line of stderr and status 2 (a usage error)."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def first_of(items: list[str], shown: int) -> str:
  """The first `shown` items joined by "; ", then "; and N more" for the rest."""
  return "; ".join(items[:shown]) + (f"; and {n} more" if (n := len(items) - shown) > 0 else "")


def describe(e: BaseException) -> str:
  """`<type>: <message>` on one line, cut at 300 characters (to quote in another message)."""
  return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
