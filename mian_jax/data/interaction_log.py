"""Interaction log -> prepared examples: the engine of the MovieLens and tabular sources.

A log is a DataFrame, one row per example: `user`, `timestamp` (larger = later), `label` (0/1),
`split` (int8 index into schema.SPLITS) and the raw field values `item.<f>`, `user.<f>`,
`context.<f>`. Behaviours, splits, vocabularies and standardisation: docs/data.md ("Rules shared
by both sources").
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mian_jax import encoding
from mian_jax.data import schema as schema_lib
from mian_jax.data import vocab as vocab_lib
from mian_jax.errors import DataError

TRAIN, VALID, TEST = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class LogSpec:
  """Which log columns become which model fields: (name, "categorical" | "numeric") pairs, the
  first item field the item id; `behavior_fields` are categorical item fields."""
  item_fields: tuple[tuple[str, str], ...]
  behavior_fields: tuple[str, ...]
  user_fields: tuple[tuple[str, str], ...]
  context_fields: tuple[tuple[str, str], ...]
  max_seq_len: int


class BadRows:
  """Counts malformed rows per input file and fails above a ratio (never silently drops much).
  A file's "first_bad": the first row recorded, or with `earliest` the earliest in the file."""

  def __init__(self, max_ratio: float, earliest: bool = False):
    self.max_ratio, self.earliest = float(max_ratio), earliest
    self.files: dict[str, dict[str, Any]] = {}
    self._first_at: dict[str, int] = {}  # the line (or row) of each file's first_bad

  def record(self, name: str, total: int, bad: np.ndarray, reason: str,
             line_numbers: Sequence[int] | None = None, lines: Sequence | None = None) -> None:
    """Adds the rows flagged in the mask `bad` [total] under `reason`. line_numbers[i]: the
    file line of row i (indexable; only the first bad row's is looked up), else rows are named
    by position; lines[i]: the text or value shown for it."""
    entry = self.files.setdefault(name, {"rows": int(total), "bad": 0, "reasons": {},
                                         "first_bad": None})
    count = int(np.count_nonzero(bad))
    if not count:
      return
    entry["bad"] += count
    entry["reasons"][reason] = entry["reasons"].get(reason, 0) + count
    if entry["first_bad"] is None or self.earliest:
      i = int(np.flatnonzero(bad)[0])
      at = int(line_numbers[i]) if line_numbers is not None else i + 1
      if entry["first_bad"] is None or at < self._first_at[name]:
        text = f" {_shown(lines[i])}" if lines is not None else ""
        where = "line" if line_numbers is not None else "row"
        entry["first_bad"], self._first_at[name] = f"{where} {at} ({reason}){text}", at

  def check(self) -> None:
    """Raises DataError if any file's share of bad rows exceeds `max_ratio`."""
    for name, e in self.files.items():
      if e["rows"] and e["bad"] / e["rows"] > self.max_ratio:
        raise DataError(
            f"{name}: {e['bad']} of {e['rows']} rows are malformed "
            f"({100 * e['bad'] / e['rows']:.2f}% > data.max_bad_row_ratio="
            f"{self.max_ratio}); first: {e['first_bad']}; reasons: {e['reasons']}")

  def summary(self) -> dict[str, Any]:
    return {name: dict(e) for name, e in self.files.items()}


def _shown(value) -> str:
  """A raw value as quoted in messages: repr, at most 80 characters of a string."""
  if isinstance(value, np.generic):
    value = value.item()
  return repr(value[:80] if isinstance(value, str) else value)


def read_delimited(path: str, sep: str, names: Sequence[str], bad: BadRows,
                   encoding: str = "latin-1") -> pd.DataFrame:
  """A headerless delimited text file as strings, with a `_line` column (1-based line numbers).

  Blank lines are skipped; a line with another number of fields than `names` is counted in `bad`
  and dropped. DataError if the file is missing, unreadable or holds no rows.
  """
  if not os.path.isfile(path):
    raise DataError(f"file not found: {path}")
  try:
    with open(path, encoding=encoding, newline="") as f:
      text = f.read()
  except OSError as e:
    raise DataError(f"cannot read {path}: {e}") from None
  lines = pd.Series(text.splitlines(), dtype=object)
  line_numbers = np.arange(1, len(lines) + 1)
  keep = (lines.str.strip() != "").to_numpy()
  lines, line_numbers = lines[keep].reset_index(drop=True), line_numbers[keep]
  if not len(lines):
    raise DataError(f"{path} is empty (no data rows)")
  malformed = (lines.str.count(re.escape(sep)) != len(names) - 1).to_numpy()
  bad.record(os.path.basename(path), len(lines), malformed,
             f"expected {len(names)} {sep!r}-separated fields", line_numbers, lines.tolist())
  good = lines[~malformed]
  if good.empty:
    frame = pd.DataFrame({n: pd.Series([], dtype=object) for n in names})
  else:
    frame = good.str.split(sep, n=len(names) - 1, expand=True, regex=False)
    frame.columns = list(names)
  frame["_line"] = line_numbers[~malformed]
  return frame.reset_index(drop=True)


def to_int(frame: pd.DataFrame, columns: Sequence[str], bad: BadRows, name: str,
           lo: int | None = None, hi: int | None = None) -> pd.DataFrame:
  """Parses `columns` as int64 in [lo, hi]; rows that fail are counted in `bad` and dropped."""
  parsed = {c: pd.to_numeric(frame[c].astype(str).str.strip(), errors="coerce") for c in columns}
  ok = np.ones(len(frame), bool)
  for c in columns:
    v = parsed[c].to_numpy(dtype=np.float64, na_value=np.nan)
    good = (np.isfinite(v) & (v == np.round(v)) & (np.abs(v) < 2.0**63)  # fits int64
            & (v >= (-np.inf if lo is None else lo)) & (v <= (np.inf if hi is None else hi)))
    bad.record(name, len(frame), ok & ~good, f"{c} is not an integer"
               + (f" in [{lo}, {hi}]" if lo is not None or hi is not None else ""),
               frame["_line"].to_numpy() if "_line" in frame else None)
    ok &= good
  out = frame[ok].assign(**{c: parsed[c][ok].astype(np.int64) for c in columns})
  return out.reset_index(drop=True)


def drop_duplicate_keys(frame: pd.DataFrame, key: str, bad: BadRows, name: str) -> pd.DataFrame:
  """Keeps the first row of each `key`; later duplicates are counted as malformed."""
  dup = frame[key].duplicated().to_numpy()
  bad.record(name, len(frame), dup, f"duplicate {key}",
             frame["_line"].to_numpy() if "_line" in frame else None)
  return frame[~dup].reset_index(drop=True)


def time_split(timestamps: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
  """Global time cut: int8 split codes [N] (0 train, 1 valid, 2 test).

  With ts sorted ascending and N rows, t_test = ts[floor((1 - test_fraction) N)] and
  t_valid = ts[floor((1 - test_fraction - valid_fraction) N)]; test is ts >= t_test, valid is
  t_valid <= ts < t_test, train the rest. Ties never straddle a cut, so every training example
  is strictly earlier than every valid/test example.
  """
  if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
    raise DataError(f"valid_fraction={valid_fraction} and test_fraction={test_fraction} must be "
                    ">= 0 with a sum below 1")
  ts = np.asarray(timestamps)
  n = len(ts)
  order = np.sort(ts)
  split = np.zeros(n, np.int8)
  if n == 0:
    return split
  cut = lambda frac: order[min(int(np.floor((1 - frac) * n)), n - 1)]  # noqa: E731
  if valid_fraction + test_fraction > 0:
    split[ts >= cut(test_fraction + valid_fraction)] = VALID
  if test_fraction > 0:
    split[ts >= cut(test_fraction)] = TEST
  return split


def previous_time_gap(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
  """Seconds since the same user's latest strictly earlier row; NaN if there is none. [N]."""
  users = pd.factorize(pd.Series(users), sort=True)[0]
  ts = np.asarray(timestamps, np.float64)
  order = np.lexsort((ts, users))
  u, t = users[order], ts[order]
  user_start, group_start = _run_starts(u, t)
  prev = np.where(group_start > user_start, t[np.maximum(group_start - 1, 0)], np.nan)
  gap = np.empty(len(ts))
  gap[order] = t - prev
  return gap


def _run_starts(u: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For rows sorted by (user, time): where each row's user run and (user, time) run start."""
  idx = np.arange(len(u))
  new_user = np.ones(len(u), bool)
  new_user[1:] = u[1:] != u[:-1]
  new_time = new_user.copy()
  new_time[1:] |= t[1:] != t[:-1]
  return tuple(np.maximum.accumulate(np.where(new, idx, 0)) for new in (new_user, new_time))


def _as_tokens(values: pd.Series) -> pd.Series:
  """Categorical raw values as strings; missing stays missing (None)."""
  s = pd.Series(values).reset_index(drop=True)
  return s.astype(str).astype(object).where(s.notna(), None)


def build_vocab(train_tokens: Sequence[pd.Series]) -> np.ndarray:
  """Sorted distinct non-missing tokens seen in training; id of vocab[k] is k + 2."""
  values = pd.concat([pd.Series(t, dtype=object) for t in train_tokens], ignore_index=True)
  return np.asarray(sorted(set(values.dropna().tolist())), dtype=object)


def encode(tokens: pd.Series, vocab: np.ndarray) -> np.ndarray:
  """Token -> int32 id: vocab[k] -> k + 2; unseen or missing -> OOV id 1."""
  pos = pd.Index(vocab, dtype=object).get_indexer(pd.Series(tokens, dtype=object))
  return np.where(pos >= 0, pos + encoding.FIRST_ID, encoding.OOV_ID).astype(np.int32)


@dataclasses.dataclass
class ListBehaviours:
  """Behaviours given per example as list columns: flat raw values of each behaviour field and
  row offsets (values of row i are flat[offsets[i]:offsets[i + 1]], oldest first)."""
  flat: dict[str, pd.Series]
  offsets: np.ndarray  # [N + 1] int64


def history_from_log(users: np.ndarray, ts: np.ndarray, mask: np.ndarray | None,
                     max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Behaviour log rows [N, T] (-1 = padding) and int64 counts [N] (not capped at T), in log row
  order: of row i, the rows j of the same user with ts[j] < ts[i] and mask[j] (default all),
  the last `max_seq_len` of them, newest first (ties in log order)."""
  n = len(users)
  by_user = np.lexsort((np.arange(n), ts, users))
  mask = np.ones(n, bool) if mask is None else np.asarray(mask, bool)[by_user]
  user_start, group_start = _run_starts(users[by_user], ts[by_user])
  beh_rows = np.append(by_user[np.flatnonzero(mask)], -1)  # per user in time order; -1 last
  cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
  end = cum[group_start]  # behaviours strictly before the row's timestamp (global rank)
  counts = end - cum[user_start]
  pos = (end - 1)[:, None] - np.arange(max_seq_len)[None, :]
  valid = np.arange(max_seq_len)[None, :] < np.minimum(counts, max_seq_len)[:, None]
  indices = np.empty((n, max_seq_len), np.int64)
  indices[by_user] = beh_rows[np.where(valid, pos, -1)]
  out = np.empty(n, np.int64)
  out[by_user] = counts
  return indices, out


def _history_from_lists(lists: ListBehaviours, max_seq_len):
  """Flat-value indices [N, T] (-1 = padding) and lengths [N]: the last T of each row's list
  (lists are given oldest first), newest first."""
  off = lists.offsets
  lengths = np.minimum(np.diff(off), max_seq_len)
  pos = (off[1:] - 1)[:, None] - np.arange(max_seq_len)[None, :]
  valid = np.arange(max_seq_len)[None, :] < lengths[:, None]
  return np.where(valid, pos, -1), lengths.astype(np.int32)


def history_indices(log: pd.DataFrame, max_seq_len: int, mask: np.ndarray | None = None,
                    lists: ListBehaviours | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Each row's behaviours as `build_examples` builds them: (indices [N, T], int32 lengths [N])
  in log row order, newest first, -1 = padding. An index is a log row (`history_from_log`), or
  with `lists` a position in the flat list values (the last T of the row's list)."""
  if lists is not None:
    return _history_from_lists(lists, max_seq_len)
  indices, counts = history_from_log(pd.factorize(log["user"], sort=True)[0],
                                     log["timestamp"].to_numpy(np.float64), mask, max_seq_len)
  return indices, np.minimum(counts, max_seq_len).astype(np.int32)


def history_column(ids: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """A behaviour column [N, T] int32: ids [M] of the rows (or list values) that `indices`
  [N, T] points at, PAD_ID 0 where an index is -1."""
  if not len(ids):
    return np.full(indices.shape, schema_lib.PAD_ID, np.int32)
  return np.where(indices >= 0, ids[np.maximum(indices, 0)], schema_lib.PAD_ID).astype(np.int32)


def standardise(values: np.ndarray, train: np.ndarray, where: str,
                describe_row: Callable[[int], str] | None = None):
  """(values - mean) / std with the training rows' mean and std, as float32; (column, mean, std).

  Raises DataError naming the largest value if that overflows: a value near 1e154 or above
  squares to infinity in the variance (float64), and a standardised value must fit float32.
  """
  with np.errstate(over="ignore", invalid="ignore"):
    mean, std = float(values[train].mean()), float(values[train].std())
    std = std if std > 0 else 1.0
    column = ((values - mean) / std).astype(np.float32)
  if not (np.isfinite(mean) and np.isfinite(std) and np.isfinite(column).all()):
    i = int(np.argmax(np.abs(values)))
    row = describe_row(i) if describe_row is not None else f"row {i + 1} of the log"
    raise DataError(f"{where}: value {values[i]:g} ({row}) is too large to standardise (the "
                    f"training variance or the standardised value overflows: mean {mean:g}, std "
                    f"{std:g}); rescale the column (e.g. log or other units) or fix the value")
  return column, mean, std


def build_examples(log: pd.DataFrame, spec: LogSpec, source: str,
                   behavior_mask: np.ndarray | None = None,
                   lists: ListBehaviours | None = None,
                   describe_row: Callable[[int], str] | None = None,
                   hash_buckets: Mapping[str, int] | None = None):
  """A log -> (schema, {split: columns}, info), columns in (timestamp, user, log row) order.

  behavior_mask: [N] bool, the rows that count as behaviours (default all; ignored with `lists`,
  behaviours given per row). describe_row(i): where log row i comes from ("log.csv line 7").
  hash_buckets: column ("item.brand") -> buckets: ids 2 + stable hash mod buckets, candidates and
  behaviours alike, instead of a training vocabulary. info: "vocab_sizes", "numeric" (mean, std)
  and, for `vocab.write_vocabularies`, "vocabularies" (column -> values in id order from 2) and
  "encoders" (of the numeric and hashed fields).
  """
  n = len(log)
  if n == 0:
    raise DataError(f"{source}: no usable rows left after dropping malformed ones")
  split_code = log["split"].to_numpy(np.int8)
  if not (split_code == TRAIN).any():
    raise DataError(f"{source}: the training split is empty (too few rows or timestamps)")
  users = pd.factorize(log["user"], sort=True)[0]
  ts = log["timestamp"].to_numpy(np.float64)
  out_order = np.lexsort((np.arange(n), users, ts))  # output order: chronological
  train = split_code == TRAIN
  if lists is None:  # gather indices into the log rows / the flat list values
    hist_idx, hist_len = history_from_log(users, ts, behavior_mask, spec.max_seq_len)
  else:
    hist_idx, hist_len = _history_from_lists(lists, spec.max_seq_len)
    flat_train = train[np.repeat(np.arange(n), np.diff(lists.offsets))]

  columns: dict[str, np.ndarray] = {}
  info: dict[str, Any] = {"vocab_sizes": {}, "numeric": {}, "vocabularies": {}, "encoders": {}}
  fields: dict[str, list[schema_lib.Field]] = {g: [] for g in schema_lib.GROUPS}
  for group, made in fields.items():
    for name, kind in getattr(spec, f"{group}_fields"):
      col = f"{group}.{name}"
      is_behavior = group == "item" and name in spec.behavior_fields
      if kind == "categorical":
        tokens = _as_tokens(log[col])
        if col in (hash_buckets or {}):
          buckets = hash_buckets[col]
          encode_tokens = functools.partial(encoding.hash_ids, buckets=buckets)
          size = schema_lib.NUM_RESERVED_IDS + buckets
          info["encoders"][col] = vocab_lib.hash_encoder(buckets, f"the value of {name}")
        else:
          seen = [tokens[train]]
          if is_behavior and lists is not None:
            seen.append(_as_tokens(lists.flat[name])[flat_train])
          vocab = build_vocab(seen)
          encode_tokens = functools.partial(encode, vocab=vocab)
          size = len(vocab) + schema_lib.NUM_RESERVED_IDS
          if not len(vocab):
            raise DataError(f"{source}: field {col!r} has no values in the training split")
          info["vocabularies"][col] = vocab
        columns[col] = ids = encode_tokens(tokens)
        info["vocab_sizes"][col] = size
        made.append(schema_lib.Field(name, "categorical", size))
        if is_behavior:
          source_ids = ids if lists is None else encode_tokens(_as_tokens(lists.flat[name]))
          columns[f"hist.{name}"] = history_column(source_ids, hist_idx)
      else:
        values = pd.to_numeric(log[col], errors="coerce").to_numpy(np.float64)
        if not np.isfinite(values).all():
          raise DataError(f"{source}: numeric field {col!r} has missing or non-finite values")
        columns[col], mean, std = standardise(values, train,
                                              f"{source}: numeric field {col!r}", describe_row)
        info["numeric"][col] = {"mean": mean, "std": std}
        info["encoders"][col] = {"kind": "standardise", "of": f"the value of {name}",
                                 "mean": mean, "std": std}
        made.append(schema_lib.Field(name, "numeric"))
  columns.update(hist_len=np.minimum(hist_len, spec.max_seq_len).astype(np.int32),
                 label=log["label"].to_numpy(np.float32), group_id=users.astype(np.int64))
  features = schema_lib.FeatureSpec(**{f"{g}_fields": tuple(fs) for g, fs in fields.items()},
                                    behavior_fields=tuple(spec.behavior_fields),
                                    max_seq_len=spec.max_seq_len)
  rows = {s: out_order[split_code[out_order] == code] for code, s in enumerate(schema_lib.SPLITS)}
  splits = {s: {name: np.ascontiguousarray(a[r]) for name, a in columns.items()}
            for s, r in rows.items()}
  schema = schema_lib.Schema(
      features=features, source=source,
      num_examples=tuple((s, len(splits[s]["label"])) for s in schema_lib.SPLITS))
  for split in schema_lib.SPLITS:
    schema_lib.validate_columns(schema, split, splits[split])
  return schema, splits, info


def write_with_stats(directory: str, schema: schema_lib.Schema,
                     splits: Mapping[str, Mapping[str, np.ndarray]],
                     stats: Mapping[str, Any],
                     write_vocabularies: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Adds num_samples, positive rates and the checksum to `stats`; writes everything (with the
  vocabularies, see schema.write_prepared) atomically."""
  stats = dict(stats)
  stats["num_samples"] = {s: schema.size(s) for s in schema_lib.SPLITS}
  stats["positive_rate"] = {s: float(splits[s]["label"].mean()) if schema.size(s) else None
                            for s in schema_lib.SPLITS}
  stats["checksum"] = schema_lib.write_prepared(directory, schema, splits,
                                                extra_files={"stats.json": stats},
                                                write_vocabularies=write_vocabularies)
  return stats
