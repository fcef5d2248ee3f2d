"""One run per workdir: an exclusive `flock` on `<workdir>/.lock` while a run writes (a second
run's orbax manager would delete the first one's save in flight). A second run fails at once
naming the holder (written into the file); the kernel drops the lock however its process ends,
and the file is kept (deleting it would let a third run lock a fresh file). Only process 0
locks and broadcasts its verdict; without flock support the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mian_jax.errors import WorkdirBusyError

LOCK_FILE = ".lock"


def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def _holder_text() -> str:
  """"pid host start-time command", one line."""
  started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  command = " ".join([os.path.basename(sys.executable)] + sys.argv)
  return " ".join(f"{os.getpid()} {socket.gethostname()} {started} {command}".split()) + "\n"


def _busy_message(workdir: str, holder: str) -> str:
  pid, host, since, *_ = holder.split() + ["?", "?", "?"]
  return (f"workdir {workdir} is in use by another run (pid {pid} on host {host} since "
          f"{since}); wait for it to finish or use another --workdir")


def _try_lock(workdir: str) -> tuple[int | None, str]:
  """Process 0's attempt: (fd, "") when locked, (None, message) when another run holds the
  lock, (None, "") when the file system cannot lock."""
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(lock_path(workdir), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
      os.close(fd)
      return None, _busy_message(workdir, holder)
    os.close(fd)
    logging.warning("Cannot lock %s (%s): running without a workdir lock; make sure no other "
                    "run uses %s", lock_path(workdir), e, workdir)
    return None, ""
  os.ftruncate(fd, 0)
  os.pwrite(fd, _holder_text().encode(), 0)
  os.fsync(fd)
  return fd, ""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock (creating the workdir) for the body, on every process of a run;
  WorkdirBusyError if another run holds it."""
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  fd, busy = _try_lock(workdir) if jax.process_index() == 0 else (None, "")
  if jax.process_count() > 1:  # every process of a second run stops, not only process 0
    if multihost_utils.broadcast_one_to_all(np.int32(bool(busy))) and not busy:
      busy = f"workdir {workdir} is in use by another run (see process 0's error)"
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
