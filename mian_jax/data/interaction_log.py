"""Interaction log -> prepared examples (MovieLens and tabular; docs/data.md, "Rules shared by
both sources"). A log: a DataFrame of `user`, `timestamp` (larger = later), `label` (0/1), `split`
(int8 index into schema.SPLITS) and raw values `item.<f>`, `user.<f>`, `context.<f>`."""

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
from mian_jax.errors import DataError

TRAIN, VALID, TEST = 0, 1, 2


class BadRows:
  """Counts malformed rows per input file and fails above a ratio (never silently drops much).
  A file's "first_bad": the first row recorded, or with `earliest` the earliest in the file."""

  def __init__(self, max_ratio: float, earliest: bool = False):
    self.max_ratio, self.earliest = float(max_ratio), earliest
    self.files: dict[str, dict[str, Any]] = {}
    self._first_at: dict[str, int] = {}  # the line (or row) of each file's first_bad

  def record(self, name: str, total: int, bad: np.ndarray, reason: str,
             line_numbers: Sequence[int] | None = None, lines: Sequence | None = None) -> None:
    """Adds the rows of the mask `bad` [total] under `reason`; the first is named by its file
    line line_numbers[i] (else its position) and shown as lines[i] (at most 80 characters)."""
    entry = self.files.setdefault(name, {"rows": int(total), "bad": 0, "reasons": {},
                                         "first_bad": None})
    count = int(np.count_nonzero(bad))
    if not count:
      return
    entry["bad"] += count
    entry["reasons"][reason] = entry["reasons"].get(reason, 0) + count
    if entry["first_bad"] is not None and not self.earliest:
      return  # a line number may need a scan of the file: only look it up when it is used
    i = int(np.flatnonzero(bad)[0])
    at = int(line_numbers[i]) if line_numbers is not None else i + 1
    if entry["first_bad"] is None or at < self._first_at[name]:
      text = ""
      if lines is not None:
        value = lines[i].item() if isinstance(lines[i], np.generic) else lines[i]
        text = f" {value[:80] if isinstance(value, str) else value!r}"
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


def read_delimited(path: str, sep: str, names: Sequence[str], bad: BadRows) -> pd.DataFrame:
  """A headerless delimited file as strings plus `_line` (1-based); blank lines skipped, lines with
  another number of fields counted in `bad` and dropped; DataError if missing, unreadable, empty."""
  if not os.path.isfile(path):
    raise DataError(f"file not found: {path}")
  try:
    with open(path, encoding="latin-1", newline="") as f:
      lines = pd.Series(f.read().splitlines(), dtype=object)
  except OSError as e:
    raise DataError(f"cannot read {path}: {e}") from None
  line_numbers = np.flatnonzero((lines.str.strip() != "").to_numpy()) + 1
  lines = lines.iloc[line_numbers - 1].reset_index(drop=True)
  if not len(lines):
    raise DataError(f"{path} is empty (no data rows)")
  malformed = (lines.str.count(re.escape(sep)) != len(names) - 1).to_numpy()
  bad.record(os.path.basename(path), len(lines), malformed,
             f"expected {len(names)} {sep!r}-separated fields", line_numbers, lines.tolist())
  frame = pd.DataFrame(lines[~malformed].str.split(sep, regex=False).tolist(), columns=names,
                       dtype=object)
  frame["_line"] = line_numbers[~malformed]
  return frame


def to_int(frame: pd.DataFrame, columns: Sequence[str], bad: BadRows, name: str) -> pd.DataFrame:
  """Parses `columns` as int64 >= 0; rows that fail are counted in `bad` and dropped."""
  parsed = {c: pd.to_numeric(frame[c].astype(str).str.strip(), errors="coerce") for c in columns}
  ok = np.ones(len(frame), bool)
  for c in columns:
    v = parsed[c].to_numpy(dtype=np.float64, na_value=np.nan)
    good = np.isfinite(v) & (v == np.round(v)) & (v >= 0) & (v < 2.0**63)  # fits int64
    bad.record(name, len(frame), ok & ~good, f"{c} is not an integer in [0, None]",
               frame["_line"].to_numpy())
    ok &= good
  out = frame[ok].assign(**{c: parsed[c][ok].astype(np.int64) for c in columns})
  return out.reset_index(drop=True)


def drop_duplicate_keys(frame: pd.DataFrame, key: str, bad: BadRows, name: str) -> pd.DataFrame:
  """Keeps the first row of each `key`; later duplicates are counted as malformed."""
  dup = frame[key].duplicated().to_numpy()
  bad.record(name, len(frame), dup, f"duplicate {key}", frame["_line"].to_numpy())
  return frame[~dup].reset_index(drop=True)


def time_split(timestamps: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
  """Global time cut: int8 split codes [N] (0 train, 1 valid, 2 test). With ts sorted, test is
  ts >= ts[floor((1 - test_fraction) N)], valid ts >= ts[floor((1 - test_fraction -
  valid_fraction) N)] before it, train the rest: ties never straddle a cut."""
  if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
    raise DataError(f"valid_fraction={valid_fraction} and test_fraction={test_fraction} must be "
                    ">= 0 with a sum below 1")
  ts = np.asarray(timestamps)
  order, split = np.sort(ts), np.zeros(len(ts), np.int8)
  for code, fraction in ((VALID, valid_fraction + test_fraction), (TEST, test_fraction)):
    if fraction > 0 and len(ts):
      split[ts >= order[min(int(np.floor((1 - fraction) * len(ts))), len(ts) - 1)]] = code
  return split


def _as_tokens(values: pd.Series) -> pd.Series:
  """Categorical raw values as strings; missing stays missing (None)."""
  s = pd.Series(values).reset_index(drop=True)
  return s.astype(str).astype(object).where(s.notna(), None)


def encode(tokens: pd.Series, vocab: np.ndarray) -> np.ndarray:
  """Token -> int32 id: vocab[k] -> k + 2; unseen or missing -> OOV id 1."""
  pos = pd.Index(vocab, dtype=object).get_indexer(pd.Series(tokens, dtype=object))
  return np.where(pos >= 0, pos + encoding.FIRST_ID, encoding.OOV_ID).astype(np.int32)


@dataclasses.dataclass
class ListBehaviors:
  """Behaviours as list columns: row i's values of f, oldest first, flat[f][offsets[i]:...]."""
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
  u, t = users[by_user], ts[by_user]
  new_user = np.r_[True, u[1:] != u[:-1]][:n]
  new_time = new_user | np.r_[True, t[1:] != t[:-1]][:n]
  # Where each row's user run and (user, time) run start, in the sorted order.
  user_start, group_start = (np.maximum.accumulate(np.where(new, np.arange(n), 0))
                             for new in (new_user, new_time))
  beh_rows = np.append(by_user[np.flatnonzero(mask)], -1)  # per user in time order; -1 last
  cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
  end = cum[group_start]  # behaviours strictly before the row's timestamp (global rank)
  counts = end - cum[user_start]
  k = np.arange(max_seq_len)
  indices = np.empty((n, max_seq_len), np.int64)
  indices[by_user] = beh_rows[np.where(k < counts[:, None], (end - 1)[:, None] - k, -1)]
  out = np.empty(n, np.int64)
  out[by_user] = counts
  return indices, out


def history_indices(log: pd.DataFrame, max_seq_len: int, mask: np.ndarray | None = None,
                    lists: ListBehaviors | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Each row's behaviours as `build_examples` builds them: (indices [N, T] newest first, -1 = pad,
  int32 lengths [N]): log rows (`history_from_log`), or positions in `lists` (its last T)."""
  if lists is not None:
    lengths, t = np.minimum(np.diff(lists.offsets), max_seq_len), np.arange(max_seq_len)
    pos = (lists.offsets[1:] - 1)[:, None] - t
    return np.where(t < lengths[:, None], pos, -1), lengths.astype(np.int32)
  indices, counts = history_from_log(pd.factorize(log["user"], sort=True)[0],
                                     log["timestamp"].to_numpy(np.float64), mask, max_seq_len)
  return indices, np.minimum(counts, max_seq_len).astype(np.int32)


def history_column(ids: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """[N, T] int32: ids [M] of the rows (or list values) `indices` [N, T] names, 0 where -1."""
  return np.append(ids, schema_lib.PAD_ID).astype(np.int32)[indices]  # index -1: the padding


def standardise(values: np.ndarray, train: np.ndarray, where: str,
                describe_row: Callable[[int], str] | None = None):
  """(float32 (values - mean) / std, mean, std) with the training rows' mean and std; DataError
  naming the largest value if that overflows (|value| >= ~1e154 squares to inf in the variance)."""
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


def build_examples(log: pd.DataFrame, groups: Mapping[str, Sequence[tuple[str, str]]],
                   behavior: Sequence[str], max_seq_len: int, source: str,
                   behavior_mask: np.ndarray | None = None,
                   lists: ListBehaviors | None = None,
                   describe_row: Callable[[int], str] | None = None,
                   hash_buckets: Mapping[str, int] | None = None):
  """A log -> (schema, {split: columns} in (timestamp, user, log row) order, info: "vocab_sizes",
  "numeric", "vocabularies", "encoders"). groups: {group: ((name, kind), ...)}, item id first;
  behaviours from the rows in behavior_mask [N] (default all) or `lists`; hash_buckets: column ->
  buckets (hashed ids, no vocabulary); describe_row(i): where log row i comes from."""
  n = len(log)
  if n == 0:
    raise DataError(f"{source}: no usable rows left after dropping malformed ones")
  split_code = log["split"].to_numpy(np.int8)
  train = split_code == TRAIN
  if not train.any():
    raise DataError(f"{source}: the training split is empty (too few rows or timestamps)")
  users = pd.factorize(log["user"], sort=True)[0]
  out_order = np.lexsort((np.arange(n), users, log["timestamp"].to_numpy(np.float64)))
  hist_idx, hist_len = history_indices(log, max_seq_len, behavior_mask, lists)
  columns: dict[str, np.ndarray] = {}
  info: dict[str, Any] = {"vocab_sizes": {}, "numeric": {}, "vocabularies": {}, "encoders": {}}
  fields: dict[str, list[schema_lib.Field]] = {g: [] for g in schema_lib.GROUPS}
  for group, name, kind in ((g, f, k) for g in fields for f, k in groups.get(g, ())):
    col, of = f"{group}.{name}", f"the value of {name}"
    if kind == "numeric":
      values = pd.to_numeric(log[col], errors="coerce").to_numpy(np.float64)
      if not np.isfinite(values).all():
        raise DataError(f"{source}: numeric field {col!r} has missing or non-finite values")
      columns[col], mean, std = standardise(values, train,
                                            f"{source}: numeric field {col!r}", describe_row)
      info["numeric"][col] = {"mean": mean, "std": std}
      info["encoders"][col] = {"kind": "standardise", "of": of, "mean": mean, "std": std}
      fields[group].append(schema_lib.Field(name, "numeric"))
      continue
    tokens = _as_tokens(log[col])
    listed = (_as_tokens(lists.flat[name])  # a behaviour field's list values
              if group == "item" and name in behavior and lists is not None else None)
    if buckets := (hash_buckets or {}).get(col):  # ids 2 + hash mod buckets
      encode_tokens = functools.partial(encoding.hash_ids, buckets=buckets)
      info["encoders"][col] = {"kind": "hash", "buckets": buckets, "of": of,
                               "first_id": encoding.FIRST_ID, "function": encoding.HASH_FUNCTION}
    else:  # sorted distinct values seen in training: id of vocab[k] is k + 2
      seen = [tokens[train]]
      if listed is not None:
        seen.append(listed[train[np.repeat(np.arange(n), np.diff(lists.offsets))]])
      vocab = np.asarray(sorted(set(pd.concat(seen, ignore_index=True).dropna())), object)
      if not len(vocab):
        raise DataError(f"{source}: field {col!r} has no values in the training split")
      encode_tokens = functools.partial(encode, vocab=vocab)
      info["vocabularies"][col] = vocab
    columns[col] = ids = encode_tokens(tokens)
    info["vocab_sizes"][col] = size = schema_lib.NUM_RESERVED_IDS + (buckets or len(vocab))
    fields[group].append(schema_lib.Field(name, "categorical", size))
    if group == "item" and name in behavior:
      hist_ids = ids if listed is None else encode_tokens(listed)
      columns[f"hist.{name}"] = history_column(hist_ids, hist_idx)
  columns.update(hist_len=hist_len, label=log["label"].to_numpy(np.float32),
                 group_id=users.astype(np.int64))
  features = schema_lib.FeatureSpec(**{f"{g}_fields": tuple(fs) for g, fs in fields.items()},
                                    behavior_fields=tuple(behavior), max_seq_len=max_seq_len)
  rows = {s: out_order[split_code[out_order] == code] for code, s in enumerate(schema_lib.SPLITS)}
  splits = {s: {name: np.ascontiguousarray(a[r]) for name, a in columns.items()}
            for s, r in rows.items()}
  num_examples = tuple((s, len(splits[s]["label"])) for s in schema_lib.SPLITS)
  schema = schema_lib.Schema(features=features, num_examples=num_examples, source=source)
  for split in schema_lib.SPLITS:
    schema_lib.validate_columns(schema, split, splits[split])
  return schema, splits, info


def write_with_stats(directory: str, schema: schema_lib.Schema,
                     splits: Mapping[str, Mapping[str, np.ndarray]],
                     stats: Mapping[str, Any],
                     write_vocabularies: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Adds num_samples, positive rates and the checksum to `stats`; writes it all atomically."""
  stats = {**stats, "num_samples": {s: schema.size(s) for s in schema_lib.SPLITS},
           "positive_rate": {s: float(splits[s]["label"].mean()) if schema.size(s) else None
                             for s in schema_lib.SPLITS}}
  stats["checksum"] = schema_lib.write_prepared(directory, schema, splits, stats,
                                                write_vocabularies)
  return stats
