"""CSV, Parquet or JSON-lines records read into a checked log, in the columns a `data.tabular`
config names (docs/data.md, "Your own logs"): the tabular source's input and predict's records."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from ml_collections import ConfigDict

from mian_jax import encoding
from mian_jax.data import interaction_log, schema, vocab
from mian_jax.errors import ConfigError, DataError

_LABELS = {**dict.fromkeys(("1", "1.0", "true", "True", "TRUE"), 1.0),
           **dict.fromkeys(("0", "0.0", "false", "False", "FALSE"), 0.0)}
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".json": "jsonl"}


def file_format(path: str) -> str:
  """"parquet", "jsonl" or "csv", by the file's extension."""
  return _EXTENSIONS.get(os.path.splitext(path)[1].lower(), "csv")


@dataclasses.dataclass(frozen=True)
class CsvLines:
  """lines[i]: the 1-based file line where row i's CSV record (records[i]; 1 = the header)
  starts, found only when asked: pyarrow's record numbers skip blank lines and multi-line values."""
  path: str
  encoding: str
  num_records: int
  records: np.ndarray

  @functools.cached_property
  def starts(self) -> np.ndarray:
    """starts[r - 1]: the line of record r."""
    if "\n".encode(self.encoding) == b"\n":  # ASCII-compatible (not e.g. UTF-16)
      breaks, last = 0, b""
      with open(self.path, "rb") as f:
        while block := f.read(1 << 24):
          breaks, last = breaks + block.count(b"\n"), block[-1:]
      if breaks + (last not in (b"", b"\n")) == self.num_records:
        return np.arange(1, self.num_records + 1)
    starts, inside = [], False
    with open(self.path, encoding=self.encoding, newline="") as f:
      for number, text in enumerate(f, 1):
        if not inside and text not in ("\n", "\r\n", "\r"):
          starts.append(number)
        if text.count('"') % 2:  # an odd number of quotes opens or closes a quoted value
          inside = not inside
    return np.asarray(starts, np.int64)

  def __getitem__(self, i) -> int:
    record = int(self.records[i])
    return int(self.starts[record - 1]) if record <= len(self.starts) else record


def _unreadable(path: str, e: Exception) -> DataError:
  return DataError(f"cannot read {path}: {' '.join(str(e).split())[:300]}")


def read_table(path: str, c: ConfigDict, bad: interaction_log.BadRows, fmt: str | None = None):
  """A CSV (strings), Parquet or JSON-lines file (`fmt`, default by `c.format`) -> (table, lines[i]:
  row i's file line, None for Parquet); malformed CSV or JSON lines counted in `bad`, dropped."""
  if not os.path.isfile(path):
    raise DataError(f"file not found: {path}")
  if fmt is None:  # data.tabular.format; "auto": Parquet by the extension, else CSV
    if c.format not in ("auto", "csv", "parquet"):
      raise DataError(f"data.tabular.format={c.format!r}; expected 'auto', 'csv' or 'parquet'")
    fmt = c.format if c.format != "auto" else file_format(path).replace("jsonl", "csv")
  if fmt == "jsonl":
    return _read_json_lines(path, c.encoding, bad)
  invalid = []
  try:
    if fmt == "parquet":
      table = pq.read_table(path)
    else:
      with open(path, newline="", encoding=c.encoding) as f:
        header = next(csv.reader(f, delimiter=c.csv_sep), None)
      if not header:
        raise DataError(f"{path} is empty (no header line)")
      header[0] = header[0].removeprefix("\ufeff")  # pyarrow drops a byte-order mark too
      handler = lambda row: invalid.append((row.number, row.text)) or "skip"  # noqa: E731
      table = pa_csv.read_csv(
          path, read_options=pa_csv.ReadOptions(encoding=c.encoding, use_threads=False),
          parse_options=pa_csv.ParseOptions(delimiter=c.csv_sep, invalid_row_handler=handler),
          convert_options=pa_csv.ConvertOptions(column_types={h: pa.string() for h in header},
                                                strings_can_be_null=True))
  except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
    raise _unreadable(path, e) from None
  total = table.num_rows + len(invalid)
  if total == 0:
    raise DataError(f"{path} is empty (no data rows)")
  if fmt == "parquet":
    return table, None
  skipped = np.zeros(total, bool)  # records 2 .. total + 1 follow the header
  skipped[[number - 2 for number, _ in invalid if number]] = True
  lines = CsvLines(path, c.encoding, total + 1, np.arange(2, total + 2))
  bad.record(os.path.basename(path), total, skipped, "wrong number of fields", lines,
             {int(number) - 2: text for number, text in invalid if number})
  kept = dataclasses.replace(lines, records=lines.records[~skipped])
  if "starts" in vars(lines):  # the file was scanned for the bad rows above: not twice
    vars(kept)["starts"] = lines.starts
  return table, kept


def _json_text(value):
  """A JSON value as a CSV cell's text ("9", "true"), lists element by element; null: None."""
  if isinstance(value, list):
    return [_json_text(v) for v in value]
  return value if value is None or isinstance(value, str) else json.dumps(value)


def _json_object(text: str) -> dict | None:
  """A JSON line's object with its values as text; None if it is not an object."""
  try:
    record = json.loads(text)
  except ValueError:
    return None
  return {k: _json_text(v) for k, v in record.items()} if isinstance(record, dict) else None


def _read_json_lines(path: str, encoding: str, bad: interaction_log.BadRows):
  """A JSON-lines file (an object per non-blank line), values as text, lists as lists of text."""
  try:
    with open(path, encoding=encoding) as f:
      lines = [(number, text.rstrip("\n")) for number, text in enumerate(f, 1) if text.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise _unreadable(path, e) from None
  if not lines:
    raise DataError(f"{path} is empty (no data rows)")
  parsed = [_json_object(text) for _, text in lines]
  invalid = np.asarray([p is None for p in parsed])
  numbers = np.asarray([number for number, _ in lines], np.int64)
  bad.record(os.path.basename(path), len(lines), invalid, "not a JSON object", numbers,
             [text for _, text in lines])
  records = [p for p in parsed if p is not None]
  columns = {}
  for k in dict.fromkeys(k for record in records for k in record):
    values = [record.get(k) for record in records]
    is_list = any(isinstance(v, list) for v in values)
    try:
      columns[k] = pa.array(values, pa.list_(pa.string()) if is_list else pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
      raise DataError(f"{path}: {k!r} holds lists in some lines and single values in others; "
                      "a behaviour list column must hold lists (or null) only") from None
  return pa.table(columns), numbers[~invalid]


def _timestamps(col: pa.ChunkedArray) -> tuple[np.ndarray, str]:
  """Seconds as float64 (NaN = missing or unparsable) and what a present value must be ("a
  number" | "a date-time"): a string column is numbers if most present values are, else dates."""
  s = col.to_pandas()
  if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
    when = pd.to_datetime(s, utc=True, errors="coerce")
  else:
    num = pd.to_numeric(s, errors="coerce")
    if 2 * num.notna().sum() >= s.notna().sum():  # most present values are numbers
      return num.to_numpy(np.float64, na_value=np.nan), "a number"
    when = pd.to_datetime(s.astype(object), utc=True, errors="coerce", format="mixed")
  seconds = (when.astype("int64") / 1e9).where(when.notna())
  return seconds.to_numpy(np.float64, na_value=np.nan), "a date-time"


def _list_lengths(lists: pa.Array) -> np.ndarray:
  return pc.fill_null(pc.list_value_length(lists), 0).to_numpy()


def _as_list_array(col: pa.ChunkedArray, sep: str) -> pa.Array:
  """A list column as a ListArray; CSV strings are split on `sep`, empty strings = empty list."""
  arr = col.combine_chunks()
  if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
    return arr
  s = arr.cast(pa.string())
  s = pc.if_else(pc.equal(pc.utf8_trim_whitespace(s), ""), pa.scalar(None, pa.string()), s)
  return pc.split_pattern(s, sep)


_HASH_KIND = re.compile(r"hash\(\s*(\d+)\s*\)")  # hash(N), N the number of buckets


def parse_fields(text: str, where: str) -> tuple[tuple[tuple[str, str], ...], dict[str, int]]:
  """"a,b:numeric,c:hash(1000)" -> ((("a", "categorical"), ("b", "numeric"), ("c",
  "categorical")), {"c": 1000}); ConfigError naming `where` and the field for a bad kind."""
  fields, buckets = [], {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, kind = (x.strip() for x in part.partition(":"))
    kind = kind or "categorical"
    if kind.startswith("hash"):
      match = _HASH_KIND.fullmatch(kind)
      if match is None or not 1 <= int(match.group(1)) <= vocab.MAX_HASH_BUCKETS:
        raise ConfigError(f"{where}: field {name!r} has kind {kind!r}; a hashed field is "
                          f"hash(N) with N, the number of buckets, an integer from 1 to "
                          f"{vocab.MAX_HASH_BUCKETS} (e.g. {name}:hash(100000))")
      buckets[name], kind = int(match.group(1)), "categorical"
    elif kind not in ("categorical", "numeric"):
      raise ConfigError(f"{where}: field {name!r} has kind {kind!r}; expected 'categorical', "
                        "'numeric' or 'hash(N)'")
    fields.append((name, kind))
  return tuple(fields), buckets


def config_fields(c: ConfigDict):
  """A `data.tabular` config's fields: ({group: ((name, kind), ...)}, behavior, hash buckets)."""
  parsed = {g: parse_fields(c[f"{g}_fields"], f"data.tabular.{g}_fields") for g in schema.GROUPS}
  groups = {g: fields for g, (fields, _) in parsed.items()}
  if not groups["item"]:
    raise DataError("data.tabular.item_fields must name at least the item id column")
  behavior = tuple(x.strip() for x in c.behavior_fields.split(",") if x.strip())
  for name in behavior:
    if dict(groups["item"]).get(name) != "categorical":
      raise DataError(f"data.tabular.behavior_fields: {name!r} must be a categorical item field")
  for key, choices in (("behavior_source", ("log", "list")), ("behavior_rows", ("clicks", "all"))):
    if c[key] not in choices:
      raise DataError(f"data.tabular.{key}={c[key]!r}; expected {choices[0]!r} or {choices[1]!r}")
  if groups["item"][0][1] != "categorical":
    raise DataError("data.tabular.item_fields: the first field (the item id) must be categorical")
  return groups, behavior, {f"{g}.{f}": n for g, (_, hashed) in parsed.items()
                            for f, n in hashed.items()}


def _whole_numbers_as_text(col: pa.ChunkedArray, name: str, field: str) -> pd.Series:
  """A float column of a categorical field (Parquet's integer ids with nulls) as the text of
  its integers, as a CSV cell reads: 9.0 -> "9", NaN -> missing; DataError if not whole."""
  values = col.to_numpy(zero_copy_only=False).astype(np.float64)
  present = ~np.isnan(values)
  whole = present & (np.floor(values) == values) & (np.abs(values) < 2.0**63)
  if (present & ~whole).any():
    raise DataError(f"{name}: categorical field {field!r} is a column of floats holding "
                    f"{float(values[present & ~whole][0])!r}, which is not a whole number; store "
                    "the field as integers or text, or declare it numeric")
  text = [str(int(v)) if ok else None for v, ok in zip(values, present)]
  return pa.array(text, pa.string()).to_pandas()


def _separator_hint(table: pa.Table, name: str, c: ConfigDict) -> str | None:
  """The error for a CSV header read as one column that holds another separator, else None."""
  if len(table.column_names) != 1:
    return None
  header = table.column_names[0]
  for sep, shown in ((";", "';'"), ("\t", "$'\\t'"), ("|", "'|'")):
    if sep != c.csv_sep and sep in header:
      return (f"{name}: the header was read as one column, {header[:60]!r}, with "
              f"data.tabular.csv_sep={c.csv_sep!r}; if {sep!r} separates the fields, pass "
              f"--config.data.tabular.csv_sep={shown}")
  return None


def read_file(path: str, c: ConfigDict, groups, behavior, bad: interaction_log.BadRows,
              fmt: str | None = None, split_code: int | None = None,
              label_optional: bool = False):
  """One file -> (table, log, {field: ListArray} or None, (name, lines, kept table rows)), bad
  rows counted and dropped. `label_optional` (to score): no label column or an empty label: NaN."""
  table, lines = read_table(path, c, bad, fmt)
  name, names = os.path.basename(path), table.column_names
  has_label = c.label in names or not label_optional
  list_cols = {}  # behaviour field -> its list column
  if c.behavior_source == "list":
    list_cols = dict((x.strip() for x in p.split(":", 1))
                     for p in c.behavior_columns.split(",") if ":" in p)
    if unmapped := [b for b in behavior if b not in list_cols]:
      raise DataError(f"data.tabular.behavior_columns must map every behaviour field "
                      f"('field:column,...'); missing {unmapped}")
  needed = {**({c.label: "label"} if has_label else {}), c.user_id: "user_id",
            c.timestamp: "timestamp", **{f: f"{g}_fields" for g in groups for f, _ in groups[g]},
            **{col: "behavior_columns" for col in list_cols.values()}}
  if absent := [f"{col!r} ({key})" for col, key in needed.items() if col not in names]:
    raise DataError(_separator_hint(table, name, c) or f"{name}: column(s) {', '.join(absent)} "
                    f"named in data.tabular not found; the file has {names}")
  if twice := [col for col in needed if names.count(col) > 1]:
    raise DataError(f"{name}: the header names column {twice[0]!r} "
                    f"{names.count(twice[0])} times; rename or drop the copies")
  ok = np.ones(table.num_rows, bool)
  valid = lambda col: table[col].is_valid().to_numpy(zero_copy_only=False)  # noqa: E731
  missing = lambda col: table[col].to_pandas().isna().to_numpy()  # noqa: E731

  def flag(mask, reason, column=None):
    """Counts the rows in `mask` not flagged before; shows the first one's `column` value."""
    mask = ok & mask
    if mask.any():
      bad.record(name, 0, mask, reason, lines,
                 None if column is None else table[column].to_pandas().to_numpy())
    ok[mask] = False

  label = np.full(len(ok), np.nan)
  if has_label:  # 0/1, NaN where the value is neither; to score, an empty label is unknown
    text = table[c.label].to_pandas().astype(object).astype(str).str.strip()
    label = text.map(_LABELS).to_numpy(np.float64)
    flag(np.isnan(label) & (valid(c.label) | (not label_optional)),
         f"label {c.label!r} is not 0/1", c.label)
  flag(missing(c.user_id), f"user id {c.user_id!r} missing")
  ts, kind = _timestamps(table[c.timestamp])
  flag(~valid(c.timestamp), f"timestamp {c.timestamp!r} missing")
  flag(~np.isfinite(ts), f"timestamp {c.timestamp!r} is not {kind} like most rows", c.timestamp)
  item_id = groups["item"][0][0]
  flag(missing(item_id), f"item id {item_id!r} missing")
  frame = {}
  for g, fields in groups.items():
    for f, kind in fields:
      values = table[f].to_pandas()
      if kind == "numeric":
        values = pd.to_numeric(values, errors="coerce")
        flag(~np.isfinite(values.to_numpy(np.float64, na_value=np.nan)),
             f"numeric field {f!r} missing or not a number", f)
      elif pa.types.is_floating(table[f].type):
        values = _whole_numbers_as_text(table[f], name, f)
      frame[f"{g}.{f}"] = values
  lists = {b: _as_list_array(table[col], c.list_sep) for b, col in list_cols.items()}
  lengths = np.asarray([_list_lengths(a) for a in lists.values()])
  flag((lengths != lengths[:1]).any(axis=0), "behaviour lists of unequal length")
  log = pd.DataFrame({"user": table[c.user_id].to_pandas().astype(str), "timestamp": ts,
                      "label": label, **frame, "split": np.int8(split_code or 0)})
  lists = {b: a.filter(pa.array(ok)) for b, a in lists.items()} if list_cols else None
  return table, log[ok].reset_index(drop=True), lists, (name, lines, np.flatnonzero(ok))


def row_describer(sources):
  """describe(i): where log row i comes from ("log.csv line 7"); sources: per file (read_file)."""
  offsets = np.cumsum([0] + [len(kept) for _, _, kept in sources])

  def describe(i: int) -> str:
    part = int(np.searchsorted(offsets, i, side="right")) - 1
    name, lines, kept = sources[part]
    row = int(kept[i - offsets[part]])
    return f"{name} line {lines[row]}" if lines is not None else f"{name} row {row + 1}"
  return describe


def list_behaviors(parts, behavior) -> interaction_log.ListBehaviors:
  """Per file {field: ListArray} -> the behaviours of the concatenated rows (values stripped)."""
  flat, offsets = {}, None
  for b in behavior:
    arrays = [part[b] for part in parts]
    lengths = np.concatenate([_list_lengths(a) for a in arrays]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = pa.concat_arrays([pc.list_flatten(a).cast(pa.string()) for a in arrays])
    flat[b] = pd.Series(values.to_pandas(), dtype=object).str.strip()
  return interaction_log.ListBehaviors(flat=flat, offsets=offsets)


@dataclasses.dataclass(frozen=True)
class Records:
  """The raw records of one file (`read_records`)."""
  log: pd.DataFrame  # the kept rows as a log (split 0, label NaN where unknown)
  lists: interaction_log.ListBehaviors | None  # behavior_source="list": their list columns
  table: pa.Table  # the file as read (raw values, every row)
  kept: np.ndarray  # [N] the table rows that `log` holds, in file order
  groups: dict[str, tuple[tuple[str, str], ...]]  # {"item" | "user" | "context": fields}
  behavior: tuple[str, ...]
  describe_row: Callable[[int], str]  # where log row i comes from, e.g. "new.csv line 7"
  labelled: bool  # the file has the label column


def read_records(path: str, tabular_config: ConfigDict, bad: interaction_log.BadRows,
                 fmt: str | None = None) -> Records:
  """One file of records read like a file of the log, the label optional (no `bad.check()`)."""
  groups, behavior, _ = config_fields(tabular_config)
  table, log, lists, source = read_file(path, tabular_config, groups, behavior, bad, fmt,
                                        label_optional=True)
  return Records(log=log, lists=list_behaviors([lists], behavior) if lists is not None else None,
                 table=table, kept=source[2], groups=groups, behavior=behavior,
                 describe_row=row_describer([source]),
                 labelled=tabular_config.label in table.column_names)


def reader_config(user_id: str, timestamp: str, item_id: str) -> ConfigDict:
  """The `data.tabular` config of another source's records (predict): the item id the only field."""
  return ConfigDict(dict(
      format="auto", csv_sep=",", encoding="utf-8", label="label", user_id=user_id,
      timestamp=timestamp, item_fields=f"{item_id}:categorical", user_fields="",
      context_fields="", behavior_fields=item_id, behavior_source="log", behavior_rows="all",
      behavior_columns="", list_sep="|"))


def encode(records: Records, directory: str, raw: Mapping[str, Any], behavior: tuple[str, ...],
           indices: np.ndarray, hist_len: np.ndarray) -> tuple[dict, dict[str, int]]:
  """Raw values per field [N] -> (a prepared split's columns but group_id, encoded with vocab/;
  unseen or missing values per categorical field); behaviours: the rows (or list values) indices."""
  vocabularies, encoders = vocab.load_vocabularies(directory), vocab.load_encoders(directory)
  encode_field = lambda field, values: encoding.encode_field(  # noqa: E731
      field, vocabularies.get(field), encoders.get(field), values)
  columns, unseen = {}, {}
  for field, values in raw.items():
    columns[field], count = encode_field(field, values)
    if columns[field].dtype == np.int32:  # ids; a numeric field is float32
      unseen[field] = count
  for name in behavior:
    ids = columns[f"item.{name}"]
    if records.lists is not None:
      ids, unseen[f"hist.{name}"] = encode_field(f"item.{name}", records.lists.flat[name])
    columns[f"hist.{name}"] = interaction_log.history_column(ids, indices)
  columns["hist_len"] = hist_len.astype(np.int32)
  columns["label"] = np.nan_to_num(records.log["label"].to_numpy(np.float32))
  return columns, unseen
