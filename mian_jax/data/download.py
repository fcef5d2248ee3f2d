"""Downloads raw data files (urllib only): progress bar, resume, size and checksum checks.

A download writes `<target>.part`, resumed with an HTTP Range request, and renames it to
`<target>` once complete and verified.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from absl import logging

from mian_jax.errors import DataError
from mian_jax.fileio import sha256_file

CHUNK_BYTES = 1 << 20
USER_AGENT = "mian-jax-downloader/1.0"


def _verify(path: str, url: str, size: int | None, sha256: str | None) -> None:
  """Raises DataError if the file at `path` has the wrong size or checksum."""
  actual = os.path.getsize(path)
  if size is not None and actual != size:
    raise DataError(f"download of {url} to {path}: expected {size} bytes, got {actual}")
  if sha256 is not None:
    digest = sha256_file(path)
    if digest != sha256.lower():
      raise DataError(f"download of {url} to {path}: sha256 {digest} does not match the "
                      f"expected {sha256.lower()}; the partial file was removed, retry")


def _total_size(response, offset: int) -> int | None:
  """The full file size from Content-Range ('bytes a-b/total') or Content-Length."""
  content_range = response.headers.get("Content-Range", "")
  if "/" in content_range and not content_range.endswith("/*"):
    return int(content_range.rsplit("/", 1)[1])
  length = response.headers.get("Content-Length")
  return int(length) + offset if length is not None else None


def _progress_bar(total: int | None, initial: int, name: str, enabled: bool):
  from tqdm import tqdm  # noqa: PLC0415 - on use; a dependency of the pinned optuna
  return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
              desc=name, disable=not enabled or not sys.stderr.isatty(), file=sys.stderr)


class UnreachableError(DataError):
  """The server could not be reached (no network); `reason` says why, in a few words."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def download(url: str, target: str, *, size: int | None = None, sha256: str | None = None,
             timeout: float = 60.0, progress: bool = True) -> str:
  """Downloads `url` (http(s) or file) to `target`, resuming `<target>.part`; returns `target`.

  An existing `target` is verified and kept. size, sha256: expected, if known (else the
  server's Content-Length is checked); progress: a tqdm bar on a terminal. DataError for an
  unreachable URL (one line naming URL and target), an HTTP error, a truncated download or a
  size or checksum mismatch.
  """
  if os.path.isfile(target):
    _verify(target, url, size, sha256)
    return target
  os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
  part = target + ".part"
  offset = os.path.getsize(part) if os.path.isfile(part) else 0
  if size is not None and offset > size:
    os.remove(part)
    offset = 0
  request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
  if offset:
    request.add_header("Range", f"bytes={offset}-")
  try:
    response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
  except urllib.error.HTTPError as e:
    if e.code == 416 and offset:  # Range not satisfiable: the .part file is already whole.
      return _finish(part, target, url, size, sha256)
    raise DataError(f"download of {url} to {target} failed: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise UnreachableError(f"cannot download {url} ({reason}); without network access fetch "
                           f"it by hand to {target} (e.g. curl -L -o {target} {url}) and rerun",
                           reason=str(reason)) from None
  with response:
    status = getattr(response, "status", 200)
    if offset and status != 206:
      logging.info("%s: the server ignored the Range request; restarting from 0", url)
      offset = 0
    total = _total_size(response, offset)
    if size is not None and total is not None and total != size:
      raise DataError(f"download of {url} to {target}: the server announces {total} bytes, "
                      f"expected {size}")
    logging.info("Downloading %s to %s (%s bytes%s)", url, target, total,
                 f", resuming at {offset}" if offset else "")
    with (_progress_bar(total, offset, os.path.basename(target), progress) as bar,
          open(part, "ab" if offset else "wb") as f):
      while True:
        try:
          block = response.read(CHUNK_BYTES)
        except OSError as e:
          raise DataError(f"download of {url} to {target} interrupted after "
                          f"{f.tell()} bytes ({e}); rerun to resume from {part}") from None
        if not block:
          break
        f.write(block)
        bar.update(len(block))
  received = os.path.getsize(part)
  if total is not None and received < total:
    raise DataError(f"download of {url} to {target} stopped at {received} of {total} bytes; "
                    f"rerun to resume from {part}")
  return _finish(part, target, url, size if size is not None else total, sha256)


def _finish(part: str, target: str, url: str, size: int | None, sha256: str | None) -> str:
  try:
    _verify(part, url, size, sha256)
  except DataError:
    os.remove(part)
    raise
  os.replace(part, target)
  return target


def ensure_files(files: Sequence[tuple[str, str]], **kwargs) -> list[str]:
  """Downloads each missing (url, target) (`download(**kwargs)`); returns the targets, or
  raises one DataError listing every file that failed."""
  failures = []
  for url, target in files:
    try:
      download(url, target, **kwargs)
    except DataError as e:
      failures.append((url, target, e))
  if len(failures) == 1:
    raise failures[0][2]
  if failures:
    raise DataError(_failures_message(failures))
  return [target for _, target in files]


def _failures_message(failures: Sequence[tuple[str, str, DataError]]) -> str:
  """One line for several failed downloads, each URL and target said once."""
  hand = "; ".join(f"{url} -> {target}" for url, target, _ in failures)
  if all(isinstance(e, UnreachableError) for _, _, e in failures):
    return (f"cannot download {len(failures)} files ({failures[0][2].reason}); without network "
            f"access fetch them by hand and rerun: {hand}")
  return f"{len(failures)} downloads failed ({failures[0][2]}). Fetch by hand: {hand}"
