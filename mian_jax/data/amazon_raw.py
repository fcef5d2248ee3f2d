"""Parsing the raw Amazon 2014 files: review lines (JSON, read in blocks by pyarrow with exactly
`json.loads`' outcome per line: docs/data.md) and metadata lines (Python literals); unusable
lines are counted, not fatal."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import gzip
import io
import json
import os
import re
import resource
import time
import zlib
from array import array
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from absl import logging

from mian_jax.data import timestamps
from mian_jax.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
BLOCK_BYTES = 1 << 23  # uncompressed review bytes per pyarrow parse (bounds the parse memory)
SPLIT_PIECES = 16  # a block pyarrow rejects is retried in this many pieces ...
MIN_ARROW_LINES = 1024  # ... down to pieces of about this many lines, then read line by line
# json.loads raises RecursionError on lines nested about 1,000 deep, which pyarrow accepts: a
# line with this many '[' / '{' bytes is left to json.loads.
MAX_ARROW_NESTING = 256
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds
REVIEW_FIELDS = ("reviewerID", "asin", "unixReviewTime")
_ARROW_PARSE = pa_json.ParseOptions(
    explicit_schema=pa.schema([("reviewerID", pa.string()), ("asin", pa.string()),
                               ("unixReviewTime", pa.int64())]),
    unexpected_field_behavior="ignore")
_ARROW_READ = pa_json.ReadOptions(use_threads=True, block_size=1 << 22)


class Progress:
  """Logs "<what>: <n> <unit> (<n/s>/s), <share>, ETA" at most every PROGRESS_SECONDS."""

  def __init__(self, what: str, total: float, unit: str):
    self.what, self.total, self.unit = what, total, unit
    self.started = self.last = time.time()
    self.cpu_started = time.process_time()

  def update(self, rows: int, position: float) -> None:
    """rows: done so far; position: how far through `total` (e.g. compressed bytes read)."""
    now = time.time()
    if now - self.last < PROGRESS_SECONDS:
      return
    self.last, elapsed = now, now - self.started
    line = f"{self.what}: {rows:,} {self.unit} ({rows / max(elapsed, 1e-9):,.0f}/s)"
    if self.total and position > 0:
      share = min(position / self.total, 1.0)
      line += f", {share:.0%}, ETA {elapsed * (1 - share) / share:.0f}s"
    logging.info("%s", line)

  def done(self, rows: int) -> None:
    elapsed = time.time() - self.started
    logging.info("%s: %s %s in %.1fs, CPU %.1fs (%s/s; peak RSS so far %.2f GB)", self.what,
                 f"{rows:,}", self.unit, elapsed, time.process_time() - self.cpu_started,
                 f"{rows / max(elapsed, 1e-9):,.0f}", peak_rss_gb())


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
  """Logs the wall and CPU time of the `with` body and the peak RSS so far."""
  started, cpu_started = time.time(), time.process_time()
  yield
  logging.info("amazon: %s took %.1fs, CPU %.1fs (peak RSS so far %.2f GB)", what,
               time.time() - started, time.process_time() - cpu_started, peak_rss_gb())


def _as_text(stream) -> io.TextIOBase:
  # Bytes that are not UTF-8 become lone surrogates: ids that differ only there stay distinct.
  return io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape")


def _blocks(path: str, what: str) -> Iterator[bytes]:
  """Whole lines of `path` (gzipped or plain), ~BLOCK_BYTES at a time, logging progress."""
  if not os.path.isfile(path):
    raise DataError(f"raw file not found: {path}")
  try:
    with open(path, "rb") as stored:
      magic = stored.read(2)
      stored.seek(0)
      content = gzip.GzipFile(fileobj=stored) if magic == GZIP_MAGIC else stored
      progress = Progress(f"amazon: reading {what} {os.path.basename(path)}",
                          os.path.getsize(path), "lines")
      rest, lines = b"", 0
      while chunk := content.read(BLOCK_BYTES):
        cut = chunk.rfind(b"\n") + 1
        if cut:
          block, rest = rest + chunk[:cut], chunk[cut:]
          lines += block.count(b"\n")
          yield block
          progress.update(lines, stored.tell())
        else:
          rest += chunk
      if rest:
        yield rest
      progress.done(lines + bool(rest))
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated / corrupt gzip stream
    problem = ("ends before its gzip stream does (a truncated download?)"
               if isinstance(e, EOFError) else f"is not a valid gzip file ({e})")
    raise DataError(f"amazon: {path} {problem}; delete it and rerun to download it again, or "
                    "replace it with a complete copy") from None
  except OSError as e:
    raise DataError(f"amazon: cannot read {path}: {e}") from None


@dataclasses.dataclass
class RawReviews:
  """The reviews in file order: user, item [R] int64 indices into user_keys / item_keys
  (first-seen order), time [R] seconds, line [R] numbers; first_skipped: "line N: <what>"."""
  user_keys: list[str]
  item_keys: list[str]
  user: np.ndarray
  item: np.ndarray
  time: np.ndarray
  counts: dict[str, int]
  line: np.ndarray | None = None
  first_skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def review_of_line(line: str) -> tuple[str, object, object, object]:
  """(outcome, reviewerID, asin, unixReviewTime) of one line; outcome: "review" or a count of
  `_ReviewColumns` ("missing_fields": ids not non-empty strings or time not an int)."""
  if not line.strip():
    return "blank_lines", None, None, None
  try:
    obj = json.loads(line)
    user, item, when = obj["reviewerID"], obj["asin"], obj["unixReviewTime"]
  except (ValueError, RecursionError):
    return "malformed_lines", None, None, None
  except (KeyError, TypeError):  # TypeError: a JSON value that is not an object
    return ("missing_fields" if isinstance(obj, dict) else "malformed_lines"), None, None, None
  if (type(user) is not str or type(item) is not str or not user or not item  # noqa: E721
      or type(when) is not int):  # noqa: E721
    return "missing_fields", None, None, None
  if not timestamps.MIN_SECONDS <= when < timestamps.MAX_SECONDS:
    return "bad_time", None, None, when
  return "review", user, item, when


class _ReviewColumns:
  """Reviews gathered block by block, and line counts; `result` numbers all blocks' keys at once."""

  def __init__(self):
    self.blocks: list[tuple] = []  # (users, user [n], items, item [n], time [n], line [n])
    self.counts = dict.fromkeys(("lines", "blank_lines", "malformed_lines", "missing_fields",
                                 "bad_time", "parsed"), 0)
    self.first: dict[str, str] = {}

  def skip(self, outcome: str, number: int, line: str, when) -> None:
    self.counts[outcome] += 1
    if outcome != "blank_lines" and outcome not in self.first:
      self.first[outcome] = f"line {number}: " + (
          timestamps.describe(when, "unixReviewTime") if outcome == "bad_time"
          else f"{line[:80]!r}")

  def add_lines(self, lines: Iterable[str], first_number: int) -> int:
    """Parses `lines` (numbered from first_number) one by one; returns how many there were."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    u_ids, i_ids, times, line_of = array("q"), array("q"), array("q"), array("q")
    number = first_number - 1
    for number, line in enumerate(lines, first_number):
      outcome, user, item, when = review_of_line(line)
      if outcome != "review":
        self.skip(outcome, number, line, when)
        continue
      u_ids.append(users.setdefault(user, len(users)))
      i_ids.append(items.setdefault(item, len(items)))
      times.append(when)
      line_of.append(number)
    self.counts["lines"] += number - first_number + 1
    as_numpy = lambda a: np.frombuffer(a, np.int64)  # noqa: E731
    self.blocks.append((list(users), as_numpy(u_ids), list(items), as_numpy(i_ids),
                        as_numpy(times), as_numpy(line_of)))
    return number - first_number + 1

  def add_block(self, block: bytes, first_number: int) -> int:
    """Parses the lines `block` from line first_number (pyarrow where exact); returns the lines."""
    lines = self._add_arrow(block, first_number)
    if lines is not None:
      return lines
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + 1
    if len(ends) < 2 * MIN_ARROW_LINES:
      return self.add_lines(_as_text(io.BytesIO(block)), first_number)
    cuts = [0, *ends[np.linspace(0, len(ends) - 1, SPLIT_PIECES + 1)[1:-1].astype(int)].tolist(),
            len(block)]
    number = first_number
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      number += self.add_block(block[lo:hi], number)
    return number - first_number

  def _add_arrow(self, block: bytes, first_number: int) -> int | None:
    """Adds pyarrow's parse of `block` (lines that are not clean reviews read again by
    `review_of_line`); returns the lines, or None (nothing added) if json.loads could differ."""
    if b"\r" in block:  # json.loads' line reading ends lines there too, pyarrow does not
      return None
    data = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    lines = len(ends) + (block[-1:] != b"\n")
    # Only lines that start with "{" or are empty: not other JSON values (a block of "null"
    # lines crashes pyarrow 26), leading whitespace or a byte order mark (pyarrow skips them).
    first_byte = data[np.concatenate([[0], ends + 1])[:lines]]
    blank = first_byte == ord("\n")
    if not (blank | (first_byte == ord("{"))).all():
      return None
    opening = np.flatnonzero((data == ord("[")) | (data == ord("{")))
    if len(opening) and np.bincount(np.searchsorted(ends, opening)).max() >= MAX_ARROW_NESTING:
      return None
    try:
      table = pa_json.read_json(pa.py_buffer(block), read_options=_ARROW_READ,
                                parse_options=_ARROW_PARSE)
      for name in REVIEW_FIELDS[:2]:
        table.column(name).validate(full=True)  # undecodable bytes: json.loads reads them
    except pa.ArrowInvalid:
      return None
    if table.num_rows != lines - blank.sum():  # pyarrow skips empty lines; 2 objects on a line
      return None
    line_numbers = first_number + np.flatnonzero(~blank)
    user, item, when = (table.column(n) for n in REVIEW_FIELDS)
    non_empty = lambda c: pc.fill_null(pc.greater(pc.binary_length(c), 0), False)  # noqa: E731
    clean = (non_empty(user).to_numpy(zero_copy_only=False)
             & non_empty(item).to_numpy(zero_copy_only=False)
             & pc.is_valid(when).to_numpy(zero_copy_only=False)
             & timestamps.plausible(pc.fill_null(when, -1).to_numpy()))
    if not clean.all():
      texts = block.splitlines(keepends=True)  # at "\n" only: no "\r" in an Arrow block
      skipped = []
      for number in line_numbers[~clean].tolist():
        line = texts[number - first_number].decode("utf-8", "surrogateescape")
        outcome, _, _, seconds = review_of_line(line)
        if outcome == "review":
          return None
        skipped.append((outcome, number, line, seconds))
      for args in skipped:
        self.skip(*args)
      table, line_numbers = table.filter(pa.array(clean)), line_numbers[clean]
    users, items = (pc.dictionary_encode(table.column(name).combine_chunks())
                    for name in REVIEW_FIELDS[:2])
    self.blocks.append((users.dictionary, users.indices.to_numpy(), items.dictionary,
                        items.indices.to_numpy(), table.column("unixReviewTime").to_numpy(),
                        line_numbers))
    self.counts["lines"] += lines
    self.counts["blank_lines"] += int(blank.sum())
    return lines

  def result(self) -> RawReviews:
    blocks, self.blocks = self.blocks, []
    user_keys, users = _number_keys([b[:2] for b in blocks])
    item_keys, items = _number_keys([b[2:4] for b in blocks])
    columns = [users, items, [b[4] for b in blocks], [b[5] for b in blocks]]
    del blocks
    joined = []
    for parts in columns:  # one column at a time, each block freed once copied
      out = np.empty(sum(map(len, parts)), np.int64)
      lo = 0
      while parts:
        part = parts.pop(0)
        out[lo:lo + len(part)] = part
        lo += len(part)
      joined.append(out)
    user, item, times, line = joined
    self.counts["parsed"] = len(user)
    return RawReviews(user_keys, item_keys, user, item, times, self.counts, line, self.first)


def _number_keys(blocks: list[tuple]) -> tuple[list[str], list[np.ndarray]]:
  """(all keys in first-seen order, per block [rows] codes into them) of blocks (distinct keys,
  a pyarrow array or a list; [rows] indices into them)."""
  if all(isinstance(keys, pa.Array) for keys, _ in blocks):  # no block was read line by line
    encoded = pc.dictionary_encode(pa.chunked_array([k for k, _ in blocks], pa.string()))
    numbers = np.concatenate([np.zeros(0, np.int64)]
                             + [c.indices.to_numpy() for c in encoded.chunks])
    keys = encoded.chunks[0].dictionary.to_pylist() if encoded.num_chunks else []
  else:  # keys with undecodable bytes cannot be in pyarrow: a dict of all keys
    index: dict[str, int] = {}
    numbers = np.fromiter((index.setdefault(k, len(index)) for keys, _ in blocks
                           for k in (keys.to_pylist() if isinstance(keys, pa.Array) else keys)),
                          np.int64)
    keys = list(index)
  starts = np.cumsum([0] + [len(block_keys) for block_keys, _ in blocks])
  return keys, [numbers[lo:][local] for lo, (_, local) in zip(starts.tolist(), blocks)]


def read_reviews(path: str) -> RawReviews:
  """The reviews of `path` (gzipped or plain) as `review_of_line` reads them, or DataError."""
  columns, number = _ReviewColumns(), 1
  for block in _blocks(path, "reviews"):
    number += columns.add_block(block, number)
  return columns.result()


def drop_duplicate_reviews(raw: RawReviews) -> tuple[RawReviews, int]:
  """(reviews, number dropped): keeps the earliest review of each (reviewer, asin) pair, ties
  in file order, so that no target is among its own behaviours."""
  # Temporaries are freed as soon as they are used: at 50 M reviews each is 400 MB.
  key = raw.user * max(len(raw.item_keys), 1) + raw.item
  sorted_key = np.sort(key)
  if not (sorted_key[1:] == sorted_key[:-1]).any():
    return raw, 0
  del sorted_key
  order = np.lexsort((raw.time, key))  # stable: equal (pair, time) keep file order
  key = key[order]
  duplicate = np.zeros(len(key), bool)
  duplicate[order[1:]] = key[1:] == key[:-1]
  del key, order
  keep = ~duplicate
  first = int(np.flatnonzero(duplicate)[0])
  first_skipped = dict(raw.first_skipped, duplicate_reviews=(
      f"line {raw.line[first]}: reviewer {raw.user_keys[raw.user[first]]!r} reviewed asin "
      f"{raw.item_keys[raw.item[first]]!r} before"))
  kept = dataclasses.replace(raw, user=raw.user[keep], item=raw.item[keep], time=raw.time[keep],
                             line=raw.line[keep], first_skipped=first_skipped)
  return kept, int(duplicate.sum())


# Fast path (docs/data.md): a line that starts {'asin': '<unwanted asin>' and cannot hold a
# second key evaluating to 'asin' (the text 'asin' / "asin" once, no backslash, no adjacent
# string literals 'as' 'in') is skipped unparsed, as `skipped_unreviewed`.
_ASIN_PREFIX = re.compile(r"\s*\{\s*'asin'\s*:\s*'([^'\\]*)'")
_ADJACENT_STRINGS = re.compile(r"""['"]\s*[uUrRbBfF]{0,2}['"]""")
# Lone surrogates (undecodable bytes) as the escapes \udcXX that a literal turns back into them.
_SURROGATE_ESCAPES = {0xDC00 + b: f"\\udc{b:02x}" for b in range(0x80, 0x100)}
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


def _literal_eval_line(text: str):
  """ast.literal_eval(text), None if malformed; lone surrogates (compile() rejects them) escaped."""
  try:
    try:
      return ast.literal_eval(text)
    except UnicodeEncodeError:
      return ast.literal_eval(text.translate(_SURROGATE_ESCAPES))
  except _LITERAL_ERRORS:
    return None


# A line of single-quoted strings without escapes, numbers, lists and dicts is, with ' read as ",
# JSON of the same value, which json.loads reads several times faster than ast.literal_eval.
_QUOTED = re.compile(r"'[^']*'")
_NOT_JSON_OUTSIDE_STRINGS = re.compile(r"[^0-9 \t\[\]{},:.eE+-]")


def _literal(text: str):
  """ast.literal_eval(text) (`_literal_eval_line`), through json.loads where that is exact."""
  if ('"' not in text and "\\" not in text
      and _NOT_JSON_OUTSIDE_STRINGS.search(_QUOTED.sub("", text)) is None):
    try:
      return json.loads(text.replace("'", '"'))
    except (ValueError, RecursionError):
      pass
  return _literal_eval_line(text)


def _unreviewed_line(line: str, wanted: Mapping[str, int]) -> bool:
  """True if `line` can only describe an item that is not in `wanted` (see above)."""
  match = _ASIN_PREFIX.match(line)
  return (match is not None and match.group(1) not in wanted and "\\" not in line
          and line.count("'asin'") + line.count('"asin"') == 1
          and _ADJACENT_STRINGS.search(line) is None)


def category_of(categories, protocol: str) -> str | None:
  """The last element of the last category path (din, mian; DIN: x[-1][-1]) or of the first
  (dien: categories[0][-1]); None if `categories` is unusable."""
  if not isinstance(categories, list) or not categories:
    return None
  path = categories[0] if protocol == "dien" else categories[-1]
  if not isinstance(path, (list, tuple)) or not path or not isinstance(path[-1], str):
    return None
  return path[-1]


def _metadata_outcome(line: str, wanted: Mapping[str, int], protocol: str,
                      categories: list[str | None]) -> str:
  """The outcome (a count of `parse_metadata`) of one line; sets the category of a wanted asin."""
  obj = _literal(line.strip())
  if not isinstance(obj, dict):
    return "malformed_lines"
  asin = obj.get("asin")
  if not isinstance(asin, str):
    return "missing_fields"
  index = wanted.get(asin)
  if index is None:
    return "skipped_unreviewed"
  if categories[index] is not None:
    return "duplicate_asin"
  categories[index] = category_of(obj.get("categories"), protocol)
  return "missing_fields" if categories[index] is None else "items_found"


def parse_metadata(lines: Iterable[str], wanted: Mapping[str, int], protocol: str):
  """(categories, counts) of Python-literal metadata lines: per index of `wanted` (asin -> index)
  the `category_of` the asin's first usable line, or None; counts of the line outcomes."""
  categories: list[str | None] = [None] * len(wanted)
  counts = dict.fromkeys(("lines", "blank_lines", "skipped_unreviewed", "malformed_lines",
                          "missing_fields", "duplicate_asin", "items_found"), 0)
  for line in lines:
    counts["lines"] += 1
    if not line.strip():
      counts["blank_lines"] += 1
    elif _unreviewed_line(line, wanted):  # most lines: skipped unparsed
      counts["skipped_unreviewed"] += 1
    else:
      counts[_metadata_outcome(line, wanted, protocol, categories)] += 1
  return categories, counts


def read_metadata(path: str, wanted: Mapping[str, int], protocol: str):
  """`parse_metadata` of `path` (gzipped or plain), or DataError."""
  return parse_metadata((line for block in _blocks(path, "metadata")
                         for line in _as_text(io.BytesIO(block))), wanted, protocol)
