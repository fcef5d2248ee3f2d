"""One run per workdir: an exclusive lock on `<workdir>/.lock` for as long as a run writes.

Two runs on one workdir would interleave checkpoints, and the second one's orbax manager would
delete the first one's in-flight save as a leftover temporary directory. So a run holds
`fcntl.flock(LOCK_EX | LOCK_NB)` on `<workdir>/.lock`, and a second one fails at once with a
one-line WorkdirBusyError naming the holder (pid, host, start time, command: written into the
file by the holder). The kernel drops the lock when its process exits, however it exits
(SIGKILL included), so a lock file left behind never blocks a later run; the file itself is
kept, since deleting it would let a third run lock a fresh file while a second still holds
the old one.

In a multi-process run only process 0 locks: the lock stands for the whole run, and on a
shared file system process 1 would find process 0's lock (flock over NFS is a lock across
hosts). Process 0's verdict is broadcast, so every process of a second run fails together.

On a file system without flock support (some FUSE mounts), the run goes on unlocked with a
warning: a missing lock must not stop training.
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
  """Process 0's attempt. Returns (file descriptor, "") when locked, (None, message) when
  another run holds the lock, (None, "") when the file system cannot lock."""
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
  """Holds the workdir's lock for the body (creating the workdir if needed).

  Every process of a run enters it (process 0 locks, the others learn its verdict).

  Raises:
    WorkdirBusyError: another run holds the lock.
  """
  workdir = os.path.abspath(workdir)
  created = not os.path.exists(workdir)
  fd, busy = (_try_lock(workdir) if jax.process_index() == 0 else (None, ""))
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
