"""Parsing the raw Amazon 2014 files: review lines (JSON) and metadata lines (Python literals).

Reads gzipped or plain files line by line into columns (`RawReviews`) and each reviewed asin's
category, counting and reporting every line it cannot use (malformed JSON or literals, missing
fields, implausible times, undecodable bytes) instead of failing on it; drops repeated reviews
of one item by one reviewer (`drop_duplicate_reviews`). `mian_jax/data/amazon.py` turns the
result into the protocols' examples.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import io
import json
import os
import re
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from mian_jax.data import timestamps
from mian_jax.errors import DataError


def open_text(path: str) -> io.TextIOBase:
  """Opens a text file for reading, gunzipping it if it starts with the gzip magic bytes.

  Bytes that are not UTF-8 decode to lone surrogates (errors="surrogateescape"), so two ids
  that differ only there stay two ids (with errors="replace" both would read as U+FFFD).
  """
  if not os.path.isfile(path):
    raise DataError(f"raw file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(2)
  if magic == b"\x1f\x8b":
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape")
  return open(path, encoding="utf-8", errors="surrogateescape")


def parse_file(path: str, parse: Callable[[io.TextIOBase], object]):
  """parse(<the opened file>); a damaged file is a DataError naming it and what to do."""
  try:
    with open_text(path) as f:
      return parse(f)
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated / corrupt gzip stream
    problem = ("ends before its gzip stream does (a truncated download?)"
               if isinstance(e, EOFError) else f"is not a valid gzip file ({e})")
    raise DataError(f"amazon: {path} {problem}; delete it and rerun to download it again, or "
                    "replace it with a complete copy") from None
  except OSError as e:
    raise DataError(f"amazon: cannot read {path}: {e}") from None


# ----------------------------------------------------------------------------- parsing


@dataclasses.dataclass
class RawReviews:
  """The needed fields of the parsed review lines, in file order (R reviews).

  user, item: [R] int64 indices into user_keys / item_keys (first-seen order).
  time: [R] int64 unixReviewTime in seconds.
  line: [R] int64 1-based line number of each review in its file.
  first_skipped: the first skipped line of each kind (a key of `counts`): "line N: <what>".
  """
  user_keys: list[str]
  item_keys: list[str]
  user: np.ndarray
  item: np.ndarray
  time: np.ndarray
  counts: dict[str, int]
  line: np.ndarray | None = None
  first_skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def parse_reviews(lines: Iterable[str]) -> RawReviews:
  """Parses JSON review lines; blank lines are skipped, bad lines counted (not fatal here).

  A line is `malformed` if it is not a JSON object, `missing_fields` if reviewerID / asin are
  not non-empty strings or unixReviewTime is not an integer, `bad_time` if unixReviewTime is
  not a Unix time in seconds between 1970 and 2099 (timestamps.py: negative, milliseconds, ...).
  """
  users: dict[str, int] = {}
  items: dict[str, int] = {}
  u_ids, i_ids, times, line_of = array("q"), array("q"), array("q"), array("q")
  lines_total = blank = malformed = missing = bad_time = 0
  first: dict[str, str] = {}
  loads = json.loads
  lo, hi = timestamps.MIN_SECONDS, timestamps.MAX_SECONDS
  for line in lines:
    lines_total += 1
    if not line.strip():
      blank += 1
      continue
    try:
      obj = loads(line)
      user, item, when = obj["reviewerID"], obj["asin"], obj["unixReviewTime"]
    except (ValueError, RecursionError):
      malformed += 1
      first.setdefault("malformed_lines", f"line {lines_total}: {line[:80]!r}")
      continue
    except (KeyError, TypeError):  # TypeError: a JSON value that is not an object
      if isinstance(obj, dict):
        missing += 1
        first.setdefault("missing_fields", f"line {lines_total}: {line[:80]!r}")
      else:
        malformed += 1
        first.setdefault("malformed_lines", f"line {lines_total}: {line[:80]!r}")
      continue
    if (type(user) is not str or type(item) is not str or not user or not item  # noqa: E721
        or type(when) is not int):  # noqa: E721
      missing += 1
      first.setdefault("missing_fields", f"line {lines_total}: {line[:80]!r}")
      continue
    if not lo <= when < hi:
      bad_time += 1
      first.setdefault("bad_time", f"line {lines_total}: "
                       + timestamps.describe(when, "unixReviewTime"))
      continue
    u = users.get(user)
    if u is None:
      u = users[user] = len(users)
    i = items.get(item)
    if i is None:
      i = items[item] = len(items)
    u_ids.append(u)
    i_ids.append(i)
    times.append(when)
    line_of.append(lines_total)
  counts = {"lines": lines_total, "blank_lines": blank, "malformed_lines": malformed,
            "missing_fields": missing, "bad_time": bad_time, "parsed": len(u_ids)}
  as_array = lambda a: np.frombuffer(a, np.int64).copy()  # noqa: E731
  return RawReviews(list(users), list(items), as_array(u_ids), as_array(i_ids), as_array(times),
                    counts, as_array(line_of), first)


def drop_duplicate_reviews(raw: RawReviews) -> tuple[RawReviews, int]:
  """Keeps the earliest review of each (reviewer, asin) pair, ties in file order.

  A repeated review would make the target of one example a behaviour of its own history (the
  label leaks). Returns (the reviews without repeats, the number dropped); the first dropped
  line goes to first_skipped["duplicate_reviews"].
  """
  key = raw.user * max(len(raw.item_keys), 1) + raw.item
  sorted_key = np.sort(key)
  if not (sorted_key[1:] == sorted_key[:-1]).any():
    return raw, 0
  order = np.lexsort((raw.time, key))  # stable: equal (pair, time) keep file order
  duplicate = np.zeros(len(key), bool)
  duplicate[order[1:]] = key[order[1:]] == key[order[:-1]]
  keep = ~duplicate
  first = int(np.flatnonzero(duplicate)[0])
  first_skipped = dict(raw.first_skipped)
  where = f"line {raw.line[first]}" if raw.line is not None else f"review {first + 1}"
  first_skipped["duplicate_reviews"] = (
      f"{where}: reviewer {raw.user_keys[raw.user[first]]!r} reviewed asin "
      f"{raw.item_keys[raw.item[first]]!r} before")
  return dataclasses.replace(
      raw, user=raw.user[keep], item=raw.item[keep], time=raw.time[keep],
      line=raw.line[keep] if raw.line is not None else None,
      first_skipped=first_skipped), int(duplicate.sum())


# Fast path: most metadata lines are of items that no review mentions. Such a line is skipped
# without parsing when `_unreviewed_line` proves that, were it a valid literal, its 'asin'
# would be the unwanted value after the prefix {'asin': '<asin>'. A second key evaluating to
# 'asin' needs the text 'asin' or "asin" (plain, triple-quoted or u/r-prefixed literals), a
# backslash escape, or adjacent string literals ('as' 'in'); lines with any of these are parsed
# in full. So the fast path returns exactly what ast.literal_eval would lead to; the one
# difference is that a malformed line of an unreviewed item is counted as skipped_unreviewed
# instead of malformed_lines.
_ASIN_PREFIX = re.compile(r"\s*\{\s*'asin'\s*:\s*'([^'\\]*)'")
_ADJACENT_STRINGS = re.compile(r"""['"]\s*[uUrRbBfF]{0,2}['"]""")
# Undecodable bytes (lone surrogates, see open_text) written as the escape \udcXX that a Python
# string literal turns back into the same character.
_SURROGATE_ESCAPES = {0xDC00 + b: f"\\udc{b:02x}" for b in range(0x80, 0x100)}
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


def _literal_eval_line(text: str):
  """ast.literal_eval(text), or None if malformed. compile() cannot take lone surrogates, so a
  line with undecodable bytes is parsed with them escaped (the asin then matches the one that
  parse_reviews read from the same bytes)."""
  try:
    return ast.literal_eval(text)
  except UnicodeEncodeError:
    try:
      return ast.literal_eval(text.translate(_SURROGATE_ESCAPES))
    except _LITERAL_ERRORS:
      return None
  except _LITERAL_ERRORS:
    return None


def _unreviewed_line(line: str, wanted: Mapping[str, int]) -> bool:
  """True if `line` can only describe an item that is not in `wanted` (see above)."""
  match = _ASIN_PREFIX.match(line)
  return (match is not None and match.group(1) not in wanted and "\\" not in line
          and line.count("'asin'") + line.count('"asin"') == 1
          and _ADJACENT_STRINGS.search(line) is None)


def category_of(categories, protocol: str) -> str | None:
  """The category string of one item under `protocol`, or None if `categories` is unusable.

  din, mian: the last element of the last category path (DIN: x[-1][-1]).
  dien: the last element of the first path (DIEN process_data.py: categories[0][-1]).
  """
  if not isinstance(categories, list) or not categories:
    return None
  path = categories[0] if protocol == "dien" else categories[-1]
  if not isinstance(path, (list, tuple)) or not path or not isinstance(path[-1], str):
    return None
  return path[-1]


def parse_metadata(lines: Iterable[str], wanted: Mapping[str, int], protocol: str):
  """Category of each wanted asin from Python-literal metadata lines (ast.literal_eval only).

  Args:
    lines: the metadata lines.
    wanted: asin -> index, the items that reviews mention.
    protocol: picks the category rule (`category_of`).

  Returns:
    (categories, counts): categories is a list, per wanted index, of the category string or
    None (no usable metadata line); counts the line outcomes. The first line of an asin wins.
  """
  categories: list[str | None] = [None] * len(wanted)
  seen = np.zeros(len(wanted), bool)
  lines_total = blank = skipped = malformed = missing = duplicate = 0
  for line in lines:
    lines_total += 1
    if not line.strip():
      blank += 1
      continue
    if _unreviewed_line(line, wanted):
      skipped += 1
      continue
    obj = _literal_eval_line(line.strip())
    if not isinstance(obj, dict):
      malformed += 1
      continue
    asin = obj.get("asin")
    if not isinstance(asin, str):
      missing += 1
      continue
    index = wanted.get(asin)
    if index is None:
      skipped += 1
      continue
    if seen[index]:
      duplicate += 1
      continue
    category = category_of(obj.get("categories"), protocol)
    if category is None:
      missing += 1
      continue
    seen[index] = True
    categories[index] = category
  counts = {"lines": lines_total, "blank_lines": blank, "skipped_unreviewed": skipped,
            "malformed_lines": malformed, "missing_fields": missing,
            "duplicate_asin": duplicate, "items_found": int(seen.sum())}
  return categories, counts
