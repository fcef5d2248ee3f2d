"""The prepared-data format every data source writes (docs/data.md): schema.json (the field groups
of §3.1, vocabulary sizes, example counts), <split>/<column>.npy (item.<f> [N], hist.<f> [N, T]
newest first padded with 0, hist_len, user.<f>, context.<f>, label, group_id, extra.<f>) and
vocab/ (vocab.py). Ids: 0 padding, 1 out of vocabulary, values from 2, all below vocab_size."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from mian_jax.encoding import FIRST_ID as NUM_RESERVED_IDS, OOV_ID  # noqa: F401 (re-exported)
from mian_jax.errors import DataError

FORMAT_VERSION = 2  # 2: behaviours newest first
SPLITS = ("train", "valid", "test")
PAD_ID = 0
GROUPS = ("item", "user", "context")
VOCAB_DIR = "vocab"  # the vocabularies and encoders of the fields (vocab.py)
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
STALE_TMP_SECONDS = 3600  # an unowned `.tmp-<name>-*` unchanged this long is stale


@dataclasses.dataclass(frozen=True)
class Field:
  """One fine-grained field x^i of eq. (1)."""
  name: str
  kind: str  # "categorical" | "numeric"
  vocab_size: int = 0  # categorical only; includes the padding and OOV ids

  @property
  def is_categorical(self) -> bool:
    return self.kind == "categorical"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """What a model needs to know about its inputs (hashable; a Flax module attribute)."""
  item_fields: tuple[Field, ...]
  behavior_fields: tuple[str, ...]  # names of item fields that also form the behaviour sequence
  user_fields: tuple[Field, ...]
  context_fields: tuple[Field, ...]
  max_seq_len: int

  def item_field(self, name: str) -> Field:
    return next(f for f in self.item_fields if f.name == name)

  def fields(self) -> dict[str, Field]:
    """"<group>.<name>" -> Field of every item, user and context field."""
    return {f"{g}.{x.name}": x for g in GROUPS for x in getattr(self, f"{g}_fields")}


@dataclasses.dataclass(frozen=True)
class Schema:
  """The content of schema.json."""
  features: FeatureSpec
  num_examples: tuple[tuple[str, int], ...]  # ((split, N), ...)
  extra_columns: tuple[str, ...] = ()
  source: str = ""  # free text: which source and settings produced it

  def size(self, split: str) -> int:
    return dict(self.num_examples)[split]

  def to_json(self) -> dict[str, Any]:
    f = self.features
    fields = lambda group: [dataclasses.asdict(x) for x in group]  # noqa: E731
    return {"format_version": FORMAT_VERSION, "max_seq_len": f.max_seq_len,
            "item_fields": fields(f.item_fields), "behavior_fields": list(f.behavior_fields),
            "user_fields": fields(f.user_fields), "context_fields": fields(f.context_fields),
            "num_examples": dict(self.num_examples), "extra_columns": list(self.extra_columns),
            "source": self.source}

  def fingerprint(self) -> str:
    """A short hash of the features (not the sizes): checkpoints record it."""
    blob = json.dumps(
        {k: v for k, v in self.to_json().items() if k not in ("num_examples", "source")},
        sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def columns(self) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Column name -> (dtype, per-example shape) for every column of a split."""
    f = self.features
    return {
        **{name: ("int32" if x.is_categorical else "float32", ())
           for name, x in f.fields().items()},
        **{f"hist.{name}": ("int32", (f.max_seq_len,)) for name in f.behavior_fields},
        "hist_len": ("int32", ()), "label": ("float32", ()), "group_id": ("int64", ()),
        **{f"extra.{name}": ("float32", ()) for name in self.extra_columns}}


def _field_from_json(d: Mapping[str, Any], where: str) -> Field:
  try:
    field = Field(name=str(d["name"]), kind=str(d["kind"]), vocab_size=int(d.get("vocab_size", 0)))
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{where}: malformed field entry {d!r} ({e})") from None
  if not _NAME_RE.match(field.name):
    raise DataError(f"{where}: field name {field.name!r} must match {_NAME_RE.pattern}")
  if field.kind not in ("categorical", "numeric"):
    raise DataError(f"{where}: field {field.name!r} has kind {field.kind!r}; "
                    "expected 'categorical' or 'numeric'")
  if field.is_categorical and field.vocab_size <= NUM_RESERVED_IDS:
    raise DataError(f"{where}: categorical field {field.name!r} needs vocab_size > "
                    f"{NUM_RESERVED_IDS} (ids 0 and 1 are reserved), got {field.vocab_size}")
  return field


def schema_from_json(d: Mapping[str, Any], where: str = "schema.json") -> Schema:
  """Parses and checks a schema.json dict; raises DataError with a one-line reason."""
  if d.get("format_version") != FORMAT_VERSION:
    raise DataError(f"{where}: prepared-data format_version {d.get('format_version')!r} is not "
                    f"the supported {FORMAT_VERSION} (version 2 stores behaviours newest first); "
                    "prepare it again: python -m mian_jax.prepare --config=<your config> "
                    "--config.data.prepared_dir=<a new directory>")
  try:
    groups = {g: tuple(_field_from_json(x, where) for x in d[f"{g}_fields"]) for g in GROUPS}
    behavior = tuple(str(x) for x in d["behavior_fields"])
    max_seq_len = int(d["max_seq_len"])
    num_examples = tuple((s, int(d["num_examples"][s])) for s in SPLITS)
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{where}: missing or malformed key {e}") from None
  if not groups["item"]:
    raise DataError(f"{where}: at least one candidate-item field is required")
  item_by_name = {x.name: x for x in groups["item"]}
  for name in behavior:
    if name not in item_by_name or not item_by_name[name].is_categorical:
      raise DataError(f"{where}: behaviour field {name!r} must be a categorical item field "
                      "(behaviours share the item fields' vocabularies)")
  if behavior and max_seq_len < 1:
    raise DataError(f"{where}: max_seq_len must be >= 1, got {max_seq_len}")
  for g, fs in groups.items():
    names = [x.name for x in fs]
    if len(set(names)) != len(names):
      raise DataError(f"{where}: duplicate field names in {g}_fields: {names}")
  features = FeatureSpec(**{f"{g}_fields": fs for g, fs in groups.items()},
                         behavior_fields=behavior, max_seq_len=max_seq_len)
  return Schema(features=features, num_examples=num_examples, source=str(d.get("source", "")),
                extra_columns=tuple(str(x) for x in d.get("extra_columns", ())))


def read_schema(directory: str) -> Schema:
  path = os.path.join(directory, "schema.json")
  if not os.path.isdir(directory):
    raise DataError(f"prepared data directory not found: {directory}")
  if not os.path.isfile(path):
    raise DataError(f"{path} not found: {directory} is not a prepared data directory")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  return schema_from_json(d, where=path)


def write_prepared(directory: str, schema: Schema,
                   splits: Mapping[str, Mapping[str, np.ndarray]],
                   stats: Mapping[str, Any] | None = None,
                   write_vocabularies: Callable[[str], None] | None = None) -> str:
  """Writes a prepared data set atomically (all of `directory` or nothing); returns its checksum.
  splits: split -> column -> array (`schema.columns()`), or split -> iterable of row blocks;
  stats.json: `stats` and "checksum"; write_vocabularies(tmp) writes vocab/ before the checksum."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  remove_stale_tmp(directory)
  tmp = tempfile.mkdtemp(prefix=_tmp_prefix(directory), dir=parent)
  try:
    for split in SPLITS:
      _write_blocks(tmp, schema, split, splits[split])
    with open(os.path.join(tmp, "schema.json"), "w") as f:
      json.dump(schema.to_json(), f, indent=2)
    if write_vocabularies is not None:
      write_vocabularies(tmp)
    checksum = dataset_checksum(tmp)
    with open(os.path.join(tmp, "stats.json"), "w") as f:
      json.dump({**(stats or {}), "checksum": checksum}, f, indent=2, sort_keys=True)
    try:  # the rename publishes everything at once
      os.rename(tmp, directory)
    except OSError as e:
      if os.path.isfile(os.path.join(directory, "schema.json")):
        return checksum  # another process finished the same preparation first (same bytes)
      raise DataError(f"cannot move the prepared data to {directory} ({e.strerror}); if it "
                      "exists, delete or move it, or choose another data.prepared_dir") from None
    return checksum
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename


def _write_blocks(directory: str, schema: Schema, split: str,
                  blocks: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]) -> None:
  """Checks a split's columns (or row blocks) and writes directory/split/ as np.save would."""
  columns, size, written = schema.columns(), schema.size(split), 0
  os.makedirs(os.path.join(directory, split))
  with contextlib.ExitStack() as stack:
    files = {name: stack.enter_context(open(os.path.join(directory, split, name + ".npy"), "wb"))
             for name in columns}
    for name, (dtype, shape) in columns.items():
      np.lib.format.write_array_header_1_0(files[name], {
          "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
          "shape": (size, *shape)})
    for block in [blocks] if isinstance(blocks, Mapping) else blocks:
      rows = len(block["label"]) if "label" in block else 0
      validate_columns(schema, split, block, num_rows=rows)
      for name in columns:
        np.ascontiguousarray(block[name]).tofile(files[name])
      written += rows
  if written != size:
    raise DataError(f"split {split!r}: {written} rows were written, the schema says {size}")


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _tmp_prefix(directory: str) -> str:
  """`.tmp-<name>-<host>-<pid>-`: names the temporary sibling's owner."""
  return f".tmp-{os.path.basename(os.path.abspath(directory))}-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except OSError as e:  # e.g. PermissionError: it exists, under another user
    return not isinstance(e, ProcessLookupError)
  return True


def remove_stale_tmp(directory: str) -> list[str]:
  """Removes and returns the temporary siblings of dead preparations: `.tmp-*-<host>-<pid>-*`
  of this host whose pid is gone, and other `.tmp-<name>-*` stale for STALE_TMP_SECONDS."""
  parent = os.path.dirname(os.path.abspath(directory))
  same_name = f".tmp-{os.path.basename(os.path.abspath(directory))}-"
  this_host = re.compile(rf"\.tmp-.+-{re.escape(_host())}-(\d+)-[a-z0-9_]{{8}}")
  removed = []
  try:
    names = os.listdir(parent)
  except OSError:  # missing, or writable but not listable: nothing to clean up
    return removed
  for name in names:
    path = os.path.join(parent, name)
    owner = this_host.fullmatch(name)
    if not (owner or name.startswith(same_name)) or os.path.islink(path) or not os.path.isdir(path):
      continue
    try:
      if owner:
        stale = not _pid_alive(int(owner.group(1)))
      else:  # the newest change to it or to an entry directly inside it
        newest = max(os.lstat(os.path.join(path, e)).st_mtime for e in [".", *os.listdir(path)])
        stale = time.time() - newest > STALE_TMP_SECONDS
    except OSError:  # removed meanwhile by its owner or another cleaner
      continue
    if stale:
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def discard(directory: str) -> None:
  """Removes `directory` by first renaming it to a temporary sibling of this process, so a
  half-finished removal is cleaned up like a dead preparation's (`remove_stale_tmp`)."""
  trash = os.path.join(os.path.dirname(os.path.abspath(directory)),
                       _tmp_prefix(directory) + uuid.uuid4().hex[:8])
  try:
    os.rename(directory, trash)
  except FileNotFoundError:  # another process moved it first
    return
  shutil.rmtree(trash, ignore_errors=True)


def dataset_checksum(directory: str) -> str:
  """sha256 over schema.json and every file of the splits and vocab/ (if any), in a fixed order."""
  digest = hashlib.sha256()
  folders = [*SPLITS, *([VOCAB_DIR] if os.path.isdir(os.path.join(directory, VOCAB_DIR)) else [])]
  for name in ["schema.json"] + [os.path.join(d, name) for d in folders
                                 for name in sorted(os.listdir(os.path.join(directory, d)))]:
    digest.update(name.encode())
    with open(os.path.join(directory, name), "rb") as f:
      while block := f.read(1 << 20):
        digest.update(block)
  return digest.hexdigest()


def verify_dataset_checksum(directory: str) -> str:
  """The checksum; DataError if stats.json recorded another (none, e.g. hand-made: accepted)."""
  checksum = dataset_checksum(directory)
  try:
    with open(os.path.join(directory, "stats.json")) as f:
      recorded = json.load(f).get("checksum")
  except (OSError, ValueError, AttributeError):
    recorded = None
  if recorded is not None and recorded != checksum:
    raise DataError(f"the prepared data in {directory} changed after it was prepared (checksum "
                    f"{checksum[:12]}, recorded {recorded[:12]}); delete the directory and "
                    "prepare it again")
  return checksum


def validate_columns(schema: Schema, split: str, columns: Mapping[str, np.ndarray],
                     num_rows: int | None = None) -> None:
  """DataError unless a split's columns (num_rows, default its size) fit names, shapes, ids."""
  expected = schema.columns()
  n = schema.size(split) if num_rows is None else num_rows
  missing = sorted(set(expected) - set(columns))
  unknown = sorted(set(columns) - set(expected))
  if missing or unknown:
    raise DataError(f"split {split!r}: columns do not match the schema "
                    f"(missing {missing}, unexpected {unknown})")
  for name, (dtype, shape) in expected.items():
    a = columns[name]
    if a.dtype != np.dtype(dtype) or a.shape != (n, *shape):
      raise DataError(f"split {split!r}, column {name!r}: expected {dtype}{[n, *shape]}, "
                      f"got {a.dtype}{list(a.shape)}")
  f = schema.features
  for name, x in f.fields().items():
    if x.is_categorical:
      _check_ids(columns[name], 1, x.vocab_size, f"split {split!r}, column '{name}'")
    elif n and not np.isfinite(columns[name]).all():
      raise DataError(f"split {split!r}, column '{name}': non-finite values")
  lengths = columns["hist_len"]
  if n and (lengths.min() < 0 or lengths.max() > f.max_seq_len):
    raise DataError(f"split {split!r}: hist_len outside [0, {f.max_seq_len}]")
  valid = np.arange(f.max_seq_len)[None, :] < lengths[:, None]
  for name in f.behavior_fields:
    a = columns[f"hist.{name}"]
    where = f"split {split!r}, column 'hist.{name}'"
    _check_ids(a, 0, f.item_field(name).vocab_size, where)
    if np.any((a == PAD_ID) == valid):
      raise DataError(f"{where}: padding id 0 must fill exactly the positions >= hist_len")
  if n and not np.isin(columns["label"], (0.0, 1.0)).all():
    raise DataError(f"split {split!r}: labels must be 0 or 1")


def newest_first(hist: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """[N, T] oldest first -> newest first: reverses each row's first lengths[i] entries."""
  t = np.arange(hist.shape[1])[None, :]
  index = np.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
  return np.take_along_axis(hist, index, axis=1)


def _check_ids(a: np.ndarray, lowest: int, vocab_size: int, where: str) -> None:
  if a.size and (a.min() < lowest or a.max() >= vocab_size):
    raise DataError(f"{where}: ids must lie in [{lowest}, {vocab_size}) "
                    f"but range over [{a.min()}, {a.max()}] (out of vocabulary)")


def load_split(directory: str, split: str, schema: Schema | None = None,
               validate: bool = True) -> dict[str, np.ndarray]:
  """Memory-maps one split's columns. With `validate`, checks them against the schema."""
  schema = schema or read_schema(directory)
  if split not in SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
  columns = {}
  for name in schema.columns():
    path = os.path.join(directory, split, name + ".npy")
    if not os.path.isfile(path):
      raise DataError(f"{path} is missing: the prepared data is incomplete or from another schema")
    try:
      columns[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # e.g. an empty or truncated file
      problem = "an empty file" if os.path.getsize(path) == 0 else f"unreadable ({e})"
      raise DataError(f"{path}: {problem}, so the prepared data in {directory} is damaged; "
                      "delete the directory and prepare it again") from None
  if validate:
    validate_columns(schema, split, columns)
  return columns
