"""Downloads raw data files (urllib only) with a progress bar and size and checksum checks,
into `<target>.part` (resumed with an HTTP Range request), renamed once complete and verified."""

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


class UnreachableError(DataError):
  """The server could not be reached (no network); `reason` says why, in a few words."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def _verified(path: str, url: str, size: int | None, sha256: str | None,
              target: str | None = None) -> str:
  """`path` if it has the expected size and checksum, else DataError; with `target`, `path` is
  the part file: removed when it is wrong, else renamed to `target` (returned)."""
  actual, problem = os.path.getsize(path), None
  if size is not None and actual != size:
    problem = f"expected {size} bytes, got {actual}"
  elif sha256 is not None and (digest := sha256_file(path)) != sha256.lower():
    problem = f"sha256 {digest} does not match the expected {sha256.lower()}"
  if problem and target:
    os.remove(path)
  if problem:
    what = "the partial file was removed, retry" if target else "delete it and download again"
    raise DataError(f"download of {url} to {path}: {problem}; {what}")
  if target:
    os.replace(path, target)
  return target or path


def download(url: str, target: str, *, size: int | None = None, sha256: str | None = None,
             timeout: float = 60.0, progress: bool = True) -> str:
  """Downloads `url` (http(s) or file) to `target` (kept if it verifies); returns `target`.
  size, sha256: expected, if known (else Content-Length is checked); progress: a tqdm bar on a
  terminal. Any failure: a one-line DataError naming URL and target."""
  from tqdm import tqdm  # noqa: PLC0415 - only when downloading
  if os.path.isfile(target):
    return _verified(target, url, size, sha256)
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
      return _verified(part, url, size, sha256, target)
    raise DataError(f"download of {url} to {target} failed: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise UnreachableError(f"cannot download {url} ({reason}); without network access fetch "
                           f"it by hand to {target} (e.g. curl -L -o {target} {url}) and rerun",
                           reason=str(reason)) from None
  with response:
    if offset and getattr(response, "status", 200) != 206:
      logging.info("%s: the server ignored the Range request; restarting from 0", url)
      offset = 0
    # The full size: from Content-Range ('bytes a-b/total'), else Content-Length.
    content_range, length = (response.headers.get(h) for h in ("Content-Range", "Content-Length"))
    if content_range and "/" in content_range and not content_range.endswith("/*"):
      total = int(content_range.rsplit("/", 1)[1])
    else:
      total = int(length) + offset if length is not None else None
    if size is not None and total is not None and total != size:
      raise DataError(f"download of {url} to {target}: the server announces {total} bytes, "
                      f"expected {size}")
    logging.info("Downloading %s to %s (%s bytes%s)", url, target, total,
                 f", resuming at {offset}" if offset else "")
    with (tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
               desc=os.path.basename(target), file=sys.stderr,
               disable=not progress or not sys.stderr.isatty()) as bar,
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
  return _verified(part, url, size if size is not None else total, sha256, target)


def ensure_files(files: Sequence[tuple[str, str]], **kwargs) -> None:
  """Downloads each missing (url, target); one DataError lists each failure's URL and target."""
  failures = []
  for url, target in files:
    try:
      download(url, target, **kwargs)
    except DataError as e:
      failures.append((url, target, e))
  if len(failures) == 1:
    raise failures[0][2]
  if failures:
    hand, first = "; ".join(f"{url} -> {target}" for url, target, _ in failures), failures[0][2]
    if all(isinstance(e, UnreachableError) for _, _, e in failures):
      raise DataError(f"cannot download {len(failures)} files ({first.reason}); without network "
                      f"access fetch them by hand and rerun: {hand}")
    raise DataError(f"{len(failures)} downloads failed ({first}). Fetch by hand: {hand}")
