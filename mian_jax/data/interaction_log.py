"""Interaction log -> prepared examples: the engine shared by the MovieLens and tabular sources.

A *log* is a pandas DataFrame with one row per example (an impression or a rating):

  user              the user (any hashable value; becomes group_id)
  timestamp         int64/float64, larger = later
  label             float 0/1
  split             int8 index into schema.SPLITS (0 train, 1 valid, 2 test)
  item.<f>, user.<f>, context.<f>   raw field values (categorical: anything; numeric: float)

Behaviours of an example are the same user's *behaviour rows* (all rows, or only those marked,
e.g. clicks) whose timestamp is strictly smaller than the example's: rows with an equal timestamp
are simultaneous and never see each other, so no example ever sees its own label or anything later.
The most recent `max_seq_len` are kept, newest first (slot 0 = the most recent), left-aligned
and padded with id 0.

Vocabularies of categorical fields are built from the training split only (candidate values, plus
behaviour values from list columns); values unseen there, and missing values, map to OOV id 1.
They are returned for `vocab.write_vocabularies`, so the prepared directory keeps them. A field
given a number of hash buckets has no vocabulary: every value is hashed (`vocab.hash_ids`), so
values unseen in training get ids too; only missing values map to OOV id 1.
Numeric fields are standardised with the training split's mean and standard deviation.
Everything is vectorised (numpy/pandas); there is no per-row Python loop.
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

from mian_jax.data import schema as schema_lib
from mian_jax.data import vocab as vocab_lib
from mian_jax.errors import DataError

TRAIN, VALID, TEST = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class LogSpec:
  """Which log columns become which model fields.

  Fields are (name, kind) pairs with kind "categorical" or "numeric". The first item field is the
  item id. `behavior_fields` names categorical item fields that also form the behaviour sequence.
  """
  item_fields: tuple[tuple[str, str], ...]
  behavior_fields: tuple[str, ...]
  user_fields: tuple[tuple[str, str], ...]
  context_fields: tuple[tuple[str, str], ...]
  max_seq_len: int


# ----------------------------------------------------------------------------- bad rows


class BadRows:
  """Counts malformed rows per input file and fails above a ratio (never silently drops much)."""

  def __init__(self, max_ratio: float):
    self.max_ratio = float(max_ratio)
    self.files: dict[str, dict[str, Any]] = {}

  def record(self, name: str, total: int, bad: np.ndarray, reason: str,
             line_numbers: Sequence[int] | None = None, lines: Sequence | None = None) -> None:
    """Adds the rows flagged in the boolean mask `bad` ([total]) under `reason`.

    line_numbers[i] is the 1-based file line of row i (anything indexable; only the first bad
    row's is looked up), else rows are named by position; lines[i] is the text or value shown
    for it.
    """
    entry = self.files.setdefault(name, {"rows": int(total), "bad": 0, "reasons": {},
                                         "first_bad": None})
    count = int(np.count_nonzero(bad))
    if not count:
      return
    entry["bad"] += count
    entry["reasons"][reason] = entry["reasons"].get(reason, 0) + count
    if entry["first_bad"] is None:
      i = int(np.flatnonzero(bad)[0])
      where = f"line {int(line_numbers[i])}" if line_numbers is not None else f"row {i + 1}"
      text = f" {_shown(lines[i])}" if lines is not None else ""
      entry["first_bad"] = f"{where} ({reason}){text}"

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
  """Reads a headerless delimited text file as strings, counting malformed rows.

  Blank lines are skipped. A line with another number of fields than `names` is malformed: it is
  counted in `bad` and dropped. The result has a `_line` column (1-based line numbers).

  Raises:
    DataError: the file is missing, unreadable or holds no rows.
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
    good = np.isfinite(v) & (v == np.round(v)) & (np.abs(v) < 2.0**63)  # fits int64
    if lo is not None:
      good &= v >= lo
    if hi is not None:
      good &= v <= hi
    bad.record(name, len(frame), ok & ~good, f"{c} is not an integer"
               + (f" in [{lo}, {hi}]" if lo is not None or hi is not None else ""),
               frame["_line"].to_numpy() if "_line" in frame else None)
    ok &= good
  out = frame[ok].copy()
  for c in columns:
    out[c] = parsed[c][ok].astype(np.int64)
  return out.reset_index(drop=True)


def drop_duplicate_keys(frame: pd.DataFrame, key: str, bad: BadRows, name: str) -> pd.DataFrame:
  """Keeps the first row of each `key`; later duplicates are counted as malformed."""
  dup = frame[key].duplicated().to_numpy()
  bad.record(name, len(frame), dup, f"duplicate {key}",
             frame["_line"].to_numpy() if "_line" in frame else None)
  return frame[~dup].reset_index(drop=True)


# ----------------------------------------------------------------------------- time


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
  """For rows sorted by (user, time): index of each row's user run and (user, time) run start."""
  n = len(u)
  idx = np.arange(n)
  new_user = np.ones(n, bool)
  new_user[1:] = u[1:] != u[:-1]
  new_time = new_user.copy()
  new_time[1:] |= t[1:] != t[:-1]
  user_start = np.maximum.accumulate(np.where(new_user, idx, 0)) if n else idx
  group_start = np.maximum.accumulate(np.where(new_time, idx, 0)) if n else idx
  return user_start, group_start


# ----------------------------------------------------------------------------- encoding


def _as_tokens(values: pd.Series) -> pd.Series:
  """Categorical raw values as strings; missing stays missing (None)."""
  s = pd.Series(values).reset_index(drop=True)
  missing = s.isna().to_numpy()
  tokens = s.astype(str).astype(object)
  tokens[missing] = None
  return tokens


def build_vocab(train_tokens: Sequence[pd.Series]) -> np.ndarray:
  """Sorted distinct non-missing tokens seen in training; id of vocab[k] is k + 2."""
  values = pd.concat([pd.Series(t, dtype=object) for t in train_tokens], ignore_index=True)
  return np.asarray(sorted(set(values.dropna().tolist())), dtype=object)


def encode(tokens: pd.Series, vocab: np.ndarray) -> np.ndarray:
  """Token -> int32 id: vocab[k] -> k + 2; unseen or missing -> OOV id 1."""
  index = pd.Index(vocab, dtype=object)
  pos = index.get_indexer(pd.Series(tokens, dtype=object))
  return np.where(pos >= 0, pos + schema_lib.NUM_RESERVED_IDS, schema_lib.OOV_ID).astype(np.int32)


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass
class ListBehaviours:
  """Behaviours given per example as list columns: flat raw values of each behaviour field and
  row offsets (values of row i are flat[offsets[i]:offsets[i + 1]], oldest first)."""
  flat: dict[str, pd.Series]
  offsets: np.ndarray  # [N + 1] int64


def _history_from_log(u, t, behavior_mask, max_seq_len):
  """For rows sorted by (user, time): behaviour-row indices [N, T] and lengths [N].

  Behaviours of row i: rows j of the same user with t[j] < t[i] and behavior_mask[j];
  the last `max_seq_len` of them, newest first. Unused positions hold index -1.
  """
  n = len(u)
  user_start, group_start = _run_starts(u, t)
  beh_rows = np.flatnonzero(behavior_mask)  # sorted, so per user in time order
  cum = np.concatenate([[0], np.cumsum(behavior_mask, dtype=np.int64)])
  end = cum[group_start]  # behaviours strictly before this row's timestamp (global rank)
  begin = cum[user_start]
  lengths = np.minimum(end - begin, max_seq_len)
  pos = (end - 1)[:, None] - np.arange(max_seq_len)[None, :]
  valid = np.arange(max_seq_len)[None, :] < lengths[:, None]
  rows = np.where(valid, beh_rows[np.where(valid, pos, 0)] if len(beh_rows) else -1, -1)
  return rows.reshape(n, max_seq_len), lengths.astype(np.int32)


def _history_from_lists(lists: ListBehaviours, max_seq_len):
  """Flat-value indices [N, T] (-1 = padding) and lengths [N]: the last T of each row's list
  (lists are given oldest first), newest first."""
  off = lists.offsets
  lengths = np.minimum(np.diff(off), max_seq_len)
  pos = (off[1:] - 1)[:, None] - np.arange(max_seq_len)[None, :]
  valid = np.arange(max_seq_len)[None, :] < lengths[:, None]
  return np.where(valid, pos, -1), lengths.astype(np.int32)


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
  """Turns a log into prepared columns.

  Args:
    log: see the module docstring; one row per example.
    spec: the field groups.
    source: free text recorded in schema.json.
    behavior_mask: [N] bool, which rows count as behaviours (default: all rows). Ignored when
      `lists` is given.
    lists: behaviours given per row instead of built from the log (rows in `log` order).
    describe_row: where log row i comes from (e.g. "log.csv line 7"), for error messages.
    hash_buckets: categorical column ("item.brand") -> number of hash buckets: its ids are
      2 + stable hash mod buckets (`vocab.hash_ids`, candidates and behaviours alike) instead
      of a training vocabulary.

  Returns:
    (schema, {split: columns}, info) with columns in the order (timestamp, user, log row) and
    info holding the vocabularies' sizes ("vocab_sizes"), numeric statistics ("numeric"), the
    vocabularies ("vocabularies": column -> values in id order from 2) and the encoders of the
    numeric (standardise) and hashed (hash) fields ("encoders"), the last two for
    `vocab.write_vocabularies`.
  """
  n = len(log)
  if n == 0:
    raise DataError(f"{source}: no usable rows left after dropping malformed ones")
  split_code = log["split"].to_numpy(np.int8)
  if not (split_code == TRAIN).any():
    raise DataError(f"{source}: the training split is empty (too few rows or timestamps)")
  users = pd.factorize(log["user"], sort=True)[0]
  ts = log["timestamp"].to_numpy(np.float64)
  by_user = np.lexsort((np.arange(n), ts, users))  # history order
  out_order = np.lexsort((np.arange(n), users, ts))  # output order: chronological
  train = split_code == TRAIN

  # Behaviour gather indices (into the log / the flat list values), in log row order.
  if lists is None:
    mask = np.ones(n, bool) if behavior_mask is None else np.asarray(behavior_mask, bool)
    hist_sorted, len_sorted = _history_from_log(users[by_user], ts[by_user], mask[by_user],
                                                spec.max_seq_len)
    hist_idx = np.full((n, spec.max_seq_len), -1, np.int64)
    hist_idx[by_user] = np.where(hist_sorted >= 0, by_user[np.maximum(hist_sorted, 0)], -1)
    hist_len = np.empty(n, np.int32)
    hist_len[by_user] = len_sorted
  else:
    hist_idx, hist_len = _history_from_lists(lists, spec.max_seq_len)
    flat_rows = np.repeat(np.arange(n), np.diff(lists.offsets))
    flat_train = train[flat_rows]

  columns: dict[str, np.ndarray] = {}
  info: dict[str, Any] = {"vocab_sizes": {}, "numeric": {}, "vocabularies": {}, "encoders": {}}
  fields: dict[str, tuple[schema_lib.Field, ...]] = {}
  for group, group_fields in (("item", spec.item_fields), ("user", spec.user_fields),
                              ("context", spec.context_fields)):
    made = []
    for name, kind in group_fields:
      col = f"{group}.{name}"
      if kind == "categorical":
        tokens = _as_tokens(log[col])
        if col in (hash_buckets or {}):
          buckets = hash_buckets[col]
          encode_tokens = functools.partial(vocab_lib.hash_ids, buckets=buckets)
          size = schema_lib.NUM_RESERVED_IDS + buckets
          info["encoders"][col] = vocab_lib.hash_encoder(buckets, f"the value of {name}")
        else:
          seen = [tokens[train]]
          if group == "item" and lists is not None and name in spec.behavior_fields:
            seen.append(_as_tokens(lists.flat[name])[flat_train])
          vocab = build_vocab(seen)
          encode_tokens = functools.partial(encode, vocab=vocab)
          size = len(vocab) + schema_lib.NUM_RESERVED_IDS
          if size <= schema_lib.NUM_RESERVED_IDS:
            raise DataError(f"{source}: field {col!r} has no values in the training split")
          info["vocabularies"][col] = vocab
        ids = encode_tokens(tokens)
        columns[col] = ids
        info["vocab_sizes"][col] = size
        made.append(schema_lib.Field(name, "categorical", size))
        if group == "item" and name in spec.behavior_fields:
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
    fields[group] = tuple(made)
  columns["hist_len"] = hist_len
  columns["label"] = log["label"].to_numpy(np.float32)
  columns["group_id"] = users.astype(np.int64)

  features = schema_lib.FeatureSpec(
      item_fields=fields["item"], behavior_fields=tuple(spec.behavior_fields),
      user_fields=fields["user"], context_fields=fields["context"],
      max_seq_len=spec.max_seq_len)
  splits = {}
  for code, split in enumerate(schema_lib.SPLITS):
    rows = out_order[split_code[out_order] == code]
    splits[split] = {name: np.ascontiguousarray(a[rows]) for name, a in columns.items()}
  schema = schema_lib.Schema(
      features=features,
      num_examples=tuple((s, len(splits[s]["label"])) for s in schema_lib.SPLITS),
      source=source)
  for split in schema_lib.SPLITS:
    schema_lib.validate_columns(schema, split, splits[split])
  return schema, splits, info


# ----------------------------------------------------------------------------- output


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
