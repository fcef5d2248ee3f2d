"""Scores with an exported model (`python -m mian_jax.export`), needing only jax and numpy.

  from mian_jax.serving import Scorer
  scorer = Scorer.load("exports/synthetic")
  out = scorer.score({"item.item_id": ids, "hist.item_id": hist, "hist_len": lengths, ...})
  out["prob"]              # [B] click probabilities
  out["attention.<name>"]  # [B, n] weights of each attention module (signature.json says over what)

This module imports jax (for `jax.export`), numpy and the standard library only: no Flax, no
model code, no config library, so a serving process carries none of them. `score` takes
encoded inputs, as in a prepared split: ids, not raw values (`signature.json` lists each
input's name, dtype, per-example shape and valid id range). `encode` turns raw values into
them with the export's `vocab/` (exports of the tabular source, or any whose fields are plain
maps, hashed values and standardised numbers):

  batch, unseen = scorer.encode({"item.item_id": ["i1", "i7"], "item.price": [3.5, 1.0],
                                 "hist.item_id": [["i3", "i1"], []], ...})
  scorer.score(batch)["prob"]

A batch of any size is scored: it is padded (with copies of its first row) to the next power
of two, so that a process compiles the exported function once per power of two it meets, not
once per batch size. Rows never affect each other (no model mixes the rows of a batch when
scoring), so padding changes no score.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mian_jax.fileio import sha256_file

FORMAT_VERSION = 1  # of the export directory (mian_jax/export.py)
EXPORT_FILE = "model.jaxexport"
PARAMS_FILE = "params.npz"
SIGNATURE_FILE = "signature.json"
MANIFEST_FILE = "manifest.json"
VOCAB_DIR = "vocab"
ENCODERS_FILE = "encoders.json"  # in VOCAB_DIR (mian_jax/data/vocab.py)
OOV_ID = 1  # the id of an unseen or missing value (mian_jax/data/schema.py)
HASH_FUNCTION = "blake2b-8-le mod buckets"  # of an encoder of kind "hash" (`_stable_hash`)
_HASH_DIGEST_BYTES = 8  # a uint64
_INT32 = np.iinfo(np.int32)
_SECONDS_PER_DAY = 86400
LOOKUP_PREFIX = "lookup."  # vocab/lookup.<key field>.json (mian_jax/data/vocab.py)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path} is missing: {os.path.dirname(path)} is not an export directory "
                     "(python -m mian_jax.export)") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def export_files(export_dir: str) -> list[str]:
  """Every file of an export directory but manifest.json, as sorted relative paths with "/"
  ("model.jaxexport", "vocab/item.item_id.json", ...): what the manifest's checksums cover."""
  found = []
  for root, dirs, files in os.walk(export_dir):
    dirs.sort()
    relative = os.path.relpath(root, export_dir)
    for name in files:
      path = name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")
      if path != MANIFEST_FILE:
        found.append(path)
  return sorted(found)


def check_files(export_dir: str, manifest: Mapping[str, Any]) -> None:
  """Raises ValueError (one line, naming the file) unless the files of `export_dir` are
  exactly those the manifest lists, each with its SHA-256."""
  expected = manifest.get("sha256", {})
  for name, digest in expected.items():
    path = os.path.join(export_dir, *name.split("/"))
    if not os.path.isfile(path):
      raise ValueError(f"{path} is missing: the export directory is incomplete; export the "
                       "checkpoint again")
    if sha256_file(path) != digest:
      raise ValueError(f"{path} differs from the checksum in {MANIFEST_FILE}: the export "
                       "was changed or damaged; export the checkpoint again")
  for name in export_files(export_dir):
    if name not in expected:
      raise ValueError(f"{os.path.join(export_dir, name)} is not covered by the checksums in "
                       f"{MANIFEST_FILE}: a file was added to the export, or it was written "
                       "by an older version; export the checkpoint again")


def _backend_platforms() -> tuple[str, ...]:
  """The `jax.export` platform names the default backend may run."""
  backend = jax.default_backend()
  return ("cuda", "rocm") if backend == "gpu" else (backend,)


def _tokens(values) -> list[str | None]:
  """Raw values as the strings vocabularies hold (str(value)); None and NaN as None."""
  return [None if v is None or (isinstance(v, (float, np.floating)) and v != v) else str(v)
          for v in values]


def _stable_hash(token: str) -> int:
  """A copy of `mian_jax.data.vocab.stable_hash` (this module imports nothing from
  mian_jax.data; tests/test_export.py checks that the two agree): the 8-byte BLAKE2b digest of
  the token's UTF-8 bytes (lone surrogates passed through), read little-endian."""
  digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"),
                           digest_size=_HASH_DIGEST_BYTES).digest()
  return int.from_bytes(digest, "little")


def _hash_ids(tokens: list[str | None], buckets: int, first_id: int) -> np.ndarray:
  """Tokens [N] -> int32 ids [N]: first_id + _stable_hash(token) mod buckets; OOV_ID if None."""
  ids = {t: first_id + _stable_hash(t) % buckets for t in set(tokens) if t is not None}
  return np.fromiter((OOV_ID if t is None else ids[t] for t in tokens), np.int32,
                     count=len(tokens))


def _missing(value: Any) -> bool:
  try:
    return value is None or bool(value != value)  # NaN
  except (TypeError, ValueError):
    return True


def _calendar(unit: str, seconds: np.ndarray) -> np.ndarray:
  s = np.floor(seconds).astype(np.int64)
  days = np.floor_divide(s, _SECONDS_PER_DAY)
  if unit == "year":
    return days.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970
  if unit == "month":
    return days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1
  if unit == "weekday":
    return (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
  if unit == "hour":
    return np.floor_divide(s, 3600) % 24
  raise ValueError(f"calendar unit {unit!r} is not one of year, month, weekday, hour")


def _apply_encoder(encoder: Mapping[str, Any], raw) -> np.ndarray:
  """A copy of `mian_jax.data.vocab.apply_encoder` (tests/test_export.py checks that the two
  agree): raw quantities [N] -> tokens (object [N], None = missing) to look up in the field's
  map, or int32 ids (id-valued buckets, hash), or float32 values (standardise)."""
  kind = encoder["kind"]
  if kind == "hash":
    if encoder.get("function") != HASH_FUNCTION:
      raise ValueError(f"a field is hashed with {encoder.get('function')!r}; this loader "
                       f"computes {HASH_FUNCTION!r}")
    return _hash_ids(_tokens(raw), int(encoder["buckets"]), int(encoder["first_id"]))
  if kind == "prefix":
    return np.asarray([None if t is None else t.strip()[:encoder["length"]]
                       for t in _tokens(raw)], dtype=object)
  if kind == "rule":
    return np.asarray(_tokens(raw), dtype=object)
  try:
    x = np.asarray([np.nan if _missing(v) else float(v) for v in raw], np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"a value of a field computed with a {kind!r} encoder ({encoder['of']}) "
                     "is not a number") from None
  missing = np.isnan(x)
  if kind == "buckets":
    bucket = np.searchsorted(np.asarray(encoder["edges"], np.float64), np.nan_to_num(x),
                             side="right")
    if "names" in encoder:
      names = np.asarray(encoder["names"], dtype=object)[bucket]
      return np.where(missing, encoder.get("missing"), names)
    bucket = np.where(missing, encoder.get("missing_bucket", -1), bucket)
    if (bucket < 0).any():
      raise ValueError(f"a value of {encoder['of']} is missing, and its buckets have none")
    return (bucket + encoder["first_id"]).astype(np.int32)
  if kind == "calendar":
    values = _calendar(encoder["unit"], np.nan_to_num(x))
    return np.where(missing, None, values.astype(str).astype(object))
  if kind == "year_span":
    width = int(encoder["width"])
    start = (np.floor(np.nan_to_num(x) / width) * width).astype(np.int64)
    spans = np.char.add(np.char.add(start.astype(str), "-"), (start + width - 1).astype(str))
    return np.where(missing, encoder["missing"], spans.astype(object))
  if kind == "standardise":
    return ((x - encoder["mean"]) / encoder["std"]).astype(np.float32)
  raise ValueError(f"unknown encoder kind {kind!r}")


def _check_sequence(value: Any, what: str, holding: str) -> None:
  """Raises ValueError unless `value` is a sequence (list, tuple, array): a string is one too,
  and encoding it would read "i1" as the two values "i" and "1"."""
  if isinstance(value, (str, bytes)):
    raise ValueError(f"{what} is a string ({value[:40]!r}); give a list of {holding}, e.g. "
                     f"[{value[:40]!r}]")
  if not hasattr(value, "__len__"):
    raise ValueError(f"{what} is a {type(value).__name__}; give a list of {holding}")


def bucket_size(num_rows: int) -> int:
  """The padded batch size: the smallest power of two >= num_rows (>= 1)."""
  return 1 << max(num_rows - 1, 0).bit_length()


class Scorer:
  """An exported model, ready to score encoded batches on this process's default device.

  Attributes:
    export_dir: the directory it was loaded from.
    signature: signature.json (inputs, ignored inputs, outputs).
    manifest: manifest.json (model, step, data checksum, platforms, versions).
    vocab_dir: the export's vocabularies (`<export_dir>/vocab`), or None if it has none.
  """

  def __init__(self, export_dir: str, exported, params: Mapping[str, Any],
               signature: Mapping[str, Any], manifest: Mapping[str, Any]):
    self.export_dir = export_dir
    self.signature = dict(signature)
    self.manifest = dict(manifest)
    vocab_dir = os.path.join(export_dir, VOCAB_DIR)
    self.vocab_dir = vocab_dir if os.path.isdir(vocab_dir) else None
    self._params = dict(params)
    self._inputs = {x["name"]: x for x in self.signature["inputs"]}
    self._ignored = frozenset(self.signature.get("ignored_inputs", ()))
    self._outputs = [x["name"] for x in self.signature["outputs"]]
    self._call = jax.jit(exported.call)
    self._vocabularies: dict[str, dict[str, int]] = {}  # read on first use (`encode`)
    self._encoder_table: dict[str, Any] | None = None
    self._lookup_table: dict[str, dict[str, Any]] | None = None

  @classmethod
  def load(cls, export_dir: str, device: jax.Device | None = None) -> Scorer:
    """Reads an export directory, checks every file (vocab/ included) against the manifest's
    checksums and puts the parameters on `device` (default: the first device).

    Raises:
      ValueError: not an export directory, a changed, missing or added file, an unsupported
        format, or an export that was not lowered for this process's platform.
    """
    manifest = _read_json(os.path.join(export_dir, MANIFEST_FILE))
    if manifest.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{os.path.join(export_dir, MANIFEST_FILE)} has format_version "
                       f"{manifest.get('format_version')!r}; this loader reads "
                       f"{FORMAT_VERSION}: export the checkpoint again")
    check_files(export_dir, manifest)
    signature = _read_json(os.path.join(export_dir, SIGNATURE_FILE))
    if signature.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{os.path.join(export_dir, SIGNATURE_FILE)} has format_version "
                       f"{signature.get('format_version')!r}; this loader reads "
                       f"{FORMAT_VERSION}: export the checkpoint again")
    running = _backend_platforms()
    exported_for = tuple(manifest.get("platforms", ()))
    if not set(running) & set(exported_for):
      raise ValueError(f"{export_dir} was exported for {','.join(exported_for)} but this "
                       f"process runs on {jax.default_backend()}; export again with "
                       f"--platforms={','.join((*exported_for, running[0]))}")
    with open(os.path.join(export_dir, EXPORT_FILE), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    device = device or jax.devices()[0]
    with np.load(os.path.join(export_dir, PARAMS_FILE), allow_pickle=False) as arrays:
      params = {name: jax.device_put(arrays[name], device) for name in arrays.files}
    return cls(export_dir, exported, params, signature, manifest)

  def encode(self, records: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Raw values -> the encoded batch `score` takes, with the export's vocab/.

    Args:
      records: for every input `<group>.<name>` but the behaviours, [B] raw values (a field
        <group>.<name> of the tabular source is its input column <name>); for every
        behaviour field `hist.<name>`, B lists of raw values, oldest first: the user's
        behaviours before this request, which the server keeps (with
        behavior_rows="clicks", the items the user clicked). A field that a lookup of vocab/
        gives from another field's raw value (an asin's category, a movie's genre, a user's
        profile; `derived_fields`) may be left out and is then looked up, in behaviours too.
        A field computed by an encoder takes the raw quantity its encoder names
        (vocab/encoders.json "of": e.g. Unix seconds for a calendar field, a number of days
        for a bucketed gap). `label`, `weight`, `group_id` may be present and are ignored.

    A categorical value is looked up as str(value), as preparation read the cell's text; an
    unseen or missing (None, NaN) one is the out-of-vocabulary id 1 and counted. A hashed
    field (encoder kind "hash") has no unseen values: str(value) is hashed as preparation
    hashed it; only a missing value is id 1 and counted. A numeric value is standardised with
    the training mean and std (encoders.json). Of each behaviour list the last T are kept,
    stored newest first; `hist_len` is their number.

    Returns:
      (the batch, {field: number of unseen or missing values}).

    Raises:
      ValueError (one line, naming the field): the export has no vocab/, a missing or
        unknown field, a string where a list is expected (a field's values, a row's
        behaviours), fields of different lengths, behaviour lists of unequal length, a
        numeric value that is missing or not a number.
    """
    if self.vocab_dir is None:
      raise ValueError(f"{self.export_dir} has no {VOCAB_DIR}/ (its data were prepared before "
                       "vocabularies were saved): encode the ids yourself")
    wanted = [name for name in self._inputs if name != "hist_len"]
    unknown = sorted(k for k in records if k not in wanted and k not in self._ignored)
    if unknown:
      raise ValueError(f"unknown field {unknown[0]!r}; encode takes {', '.join(wanted)}")
    derived = {name: source for name, source in self.derived_fields().items()
               if name not in records and source[0] in records}
    required = [name for name in wanted if name not in derived]
    for name in required:
      if name not in records:
        raise ValueError(f"field {name!r} is missing; encode takes {', '.join(required)}")
      _check_sequence(records[name], f"field {name!r}", "one value per row")
      if len(records[name]) != len(records[required[0]]):
        raise ValueError(f"field {name!r} has {len(records[name])} rows but {required[0]!r} "
                         f"has {len(records[required[0]])}")
    num_rows = len(records[required[0]]) if required else 0
    hist = [name for name in wanted if name.startswith("hist.")]
    batch, unseen = {}, {}
    for name in wanted:
      if name in hist:
        continue
      raw = records[name] if name in records else self._looked_up(records, name, derived)
      if self._inputs[name]["dtype"] == "int32":
        batch[name], unseen[name] = self._ids(name, name, raw)
      else:
        batch[name] = self._standardise(name, raw)
    max_len = self._inputs[hist[0]]["shape"][0] if hist else 0
    lengths, flat = np.zeros(num_rows, np.int32), {}
    for name in sorted(hist, key=lambda n: n in derived):  # given lists first
      if name in derived:
        flat[name] = self._looked_up(flat, name, derived)
        continue
      for row, x in enumerate(records[name]):
        if x is not None:
          _check_sequence(x, f"behaviour field {name!r} row {row}", "its behaviours")
      lists = [list(x) if x is not None else [] for x in records[name]]
      kept = [x[len(x) - max_len:] if len(x) > max_len else x for x in lists]
      row_lengths = np.asarray([len(x) for x in kept], np.int32)
      if flat and (row_lengths != lengths).any():
        raise ValueError(f"behaviour lists {name!r} and {next(iter(flat))!r} differ in length "
                         f"in row {int(np.argmax(row_lengths != lengths))}")
      lengths = row_lengths
      flat[name] = [v for x in kept for v in reversed(x)]  # newest first
    for name in hist:
      ids, unseen[name] = self._ids(name, f"item.{name[len('hist.'):]}", flat[name])
      column = np.zeros((num_rows, max_len), np.int32)
      column[np.arange(max_len)[None, :] < lengths[:, None]] = ids
      batch[name] = column
    batch["hist_len"] = lengths
    return batch, unseen

  def derived_fields(self) -> dict[str, tuple[str, str]]:
    """Inputs a lookup of vocab/ gives: {input: (the input whose raw value is the key, the
    lookup's field)}, e.g. {"item.category": ("item.item_id", "item.category"),
    "hist.category": ("hist.item_id", "item.category")}."""
    out = {}
    for key, lookup in self._lookups().items():
      for field in lookup["fields"]:
        group, name = field.split(".", 1)
        out[field] = (key, field)
        if group == "item" and key.startswith("item."):
          out[f"hist.{name}"] = (f"hist.{key[len('item.'):]}", field)
    return {name: source for name, source in out.items()
            if name in self._inputs and source[0] in self._inputs}

  def _looked_up(self, records: Mapping[str, Any], name: str,
                 derived: Mapping[str, tuple[str, str]]) -> list[Any]:
    """The raw values of `name` looked up by the raw values of its key input (None where the
    key is unknown to the lookup)."""
    key, field = derived[name]
    lookup = self._lookups()[key if key in self._lookups() else f"item.{key[len('hist.'):]}"]
    values, rows = lookup["fields"][field], lookup["rows"]
    return [None if t is None or t not in rows else values[rows[t]]
            for t in _tokens(records[key])]

  def _lookups(self) -> dict[str, dict[str, Any]]:
    """key field -> {"rows": {str(key): row}, "fields": {field: values}} of vocab/lookup.*,
    read once."""
    if self._lookup_table is None:
      self._lookup_table = {}
      for file in sorted(os.listdir(self.vocab_dir)):
        if file.startswith(LOOKUP_PREFIX):
          content = _read_json(os.path.join(self.vocab_dir, file))
          self._lookup_table[content["key"]] = {
              "rows": {k: i for i, k in enumerate(content["keys"])},
              "fields": content["fields"]}
    return self._lookup_table

  def _ids(self, name: str, field: str, raw) -> tuple[np.ndarray, int]:
    """Raw values of `field` -> int32 ids: its encoder applied (if any), then its map, with
    OOV_ID for an unseen (not hashed) or missing value; and how many were OOV_ID."""
    encoder = self._encoders().get(field)
    try:
      values = (np.asarray(_tokens(raw), dtype=object) if encoder is None
                else _apply_encoder(encoder, raw))
    except ValueError as e:
      raise ValueError(f"field {name!r}: {e}") from None
    if values.dtype == object:
      ids = self._vocabulary(field)
      values = np.fromiter((OOV_ID if t is None else ids.get(t, OOV_ID) for t in values),
                           np.int32, count=len(values))
    return values, int(np.count_nonzero(values == OOV_ID))

  def _standardise(self, name: str, values) -> np.ndarray:
    encoder = self._encoders().get(name)
    if encoder is None or encoder.get("kind") != "standardise":
      raise ValueError(f"numeric field {name!r} has no standardise encoder in "
                       f"{VOCAB_DIR}/{ENCODERS_FILE}; encode it yourself")
    try:
      x = np.asarray([float(v) for v in values], np.float64)
    except (TypeError, ValueError):
      x = np.asarray([np.nan])
    if not np.isfinite(x).all():
      raise ValueError(f"numeric field {name!r} holds a missing value or one that is not a "
                       "finite number")
    return ((x - encoder["mean"]) / encoder["std"]).astype(np.float32)

  def _encoders(self) -> dict[str, Any]:
    """vocab/encoders.json's fields, read once."""
    if self._encoder_table is None:
      self._encoder_table = _read_json(os.path.join(self.vocab_dir, ENCODERS_FILE))["fields"]
    return self._encoder_table

  def _vocabulary(self, field: str) -> dict[str, int]:
    """str(raw value) -> id of a field (vocab/<field>.json), read once."""
    if field not in self._vocabularies:
      content = _read_json(os.path.join(self.vocab_dir, f"{field}.json"))
      first = int(content["first_id"])
      self._vocabularies[field] = {v: first + k for k, v in enumerate(content["values"])}
    return self._vocabularies[field]

  @property
  def input_names(self) -> tuple[str, ...]:
    return tuple(self._inputs)

  @property
  def output_names(self) -> tuple[str, ...]:
    return tuple(self._outputs)

  def check_inputs(self, batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Checks an encoded batch against signature.json and casts it to the exported dtypes.

    `batch` maps input names to arrays ({"item.item_id": [B], "hist.item_id": [B, T], ...}),
    or is a nested batch of `mian_jax.data.pipeline.gather_batch` ({"item": {"item_id": ...}});
    the signature's ignored inputs (label, weight, ...) may be present.

    Returns:
      ({input name: array}, B).

    Raises:
      ValueError (one line, naming the field): a missing or unknown input, a wrong dtype or
        per-example shape, inputs of different lengths, an id outside its range.
    """
    flat: dict[str, Any] = {}
    for key, value in batch.items():
      if isinstance(value, Mapping):
        flat.update({f"{key}.{name}": v for name, v in value.items()})
      else:
        flat[key] = value
    unknown = sorted(k for k in flat if k not in self._inputs and k not in self._ignored
                     and not k.startswith("extra."))
    if unknown:
      raise ValueError(f"unknown input {unknown[0]!r}; the model reads "
                       f"{', '.join(self._inputs)}")
    inputs, num_rows, first = {}, None, None
    for name, spec in self._inputs.items():
      if name not in flat:
        raise ValueError(f"input {name!r} is missing ({spec['dtype']} of per-example shape "
                         f"{spec['shape']})")
      array = np.asarray(flat[name])
      inputs[name] = self._check_input(name, spec, array)
      if num_rows is None:
        num_rows, first = array.shape[0], name
      elif array.shape[0] != num_rows:
        raise ValueError(f"input {name!r} has {array.shape[0]} rows but {first!r} has "
                         f"{num_rows}")
    return inputs, int(num_rows or 0)

  @staticmethod
  def _check_input(name: str, spec: Mapping[str, Any], array: np.ndarray) -> np.ndarray:
    shape = tuple(spec["shape"])
    if array.ndim != 1 + len(shape) or array.shape[1:] != shape:
      expected = ", ".join(["batch", *map(str, shape)])
      raise ValueError(f"input {name!r} has shape {list(array.shape)}; expected [{expected}]")
    if spec["dtype"] == "int32":
      if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"input {name!r} holds {array.dtype} values; expected integer ids "
                         "(int32)")
      low, high = spec.get("range", (_INT32.min, _INT32.max + 1))
      if array.size and (array.min() < low or array.max() >= high):
        raise ValueError(f"input {name!r} holds values in [{array.min()}, {array.max()}]; "
                         f"expected [{low}, {high - 1}] (encode unseen values as the "
                         "out-of-vocabulary id 1)")
      return array.astype(np.int32, copy=False)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
      raise ValueError(f"input {name!r} holds {array.dtype} values; expected numbers "
                       f"({spec['dtype']})")
    array = array.astype(spec["dtype"], copy=False)
    if not np.isfinite(array).all():
      raise ValueError(f"input {name!r} holds NaN or infinite values")
    return array

  def score(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Scores an encoded batch of any size (`check_inputs` says what it may hold).

    Returns:
      {"prob": [B] float32, "attention.<module>": [B, n] float32, ...} as NumPy arrays, in the
      order of the signature's outputs.
    """
    inputs, num_rows = self.check_inputs(batch)
    if num_rows == 0:
      return {x["name"]: np.zeros((0, *x["shape"]), x["dtype"])
              for x in self.signature["outputs"]}
    padded = bucket_size(num_rows)
    if padded > num_rows:
      rows = np.concatenate([np.arange(num_rows), np.zeros(padded - num_rows, np.int64)])
      inputs = {name: array[rows] for name, array in inputs.items()}
    out = jax.device_get(self._call(self._params, inputs))
    return {name: np.asarray(out[name])[:num_rows] for name in self._outputs}
