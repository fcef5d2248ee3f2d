"""Vocabularies kept with the prepared data: how raw values become a directory's columns.

Every source writes, inside the prepared directory (through `schema.write_prepared`, so they
appear atomically with the columns and are covered by `schema.dataset_checksum`):

  vocab/<group>.<field>.json   the raw-value -> id map of a categorical field (none for a
                               hashed one: encoder kind "hash" below):
                               {"field": "item.item_id", "first_id": 2, "values": [v0, v1, ...]}
                               value v_k (a string) has id first_id + k; any other value, and a
                               missing one, has the out-of-vocabulary id 1 (OOV_ID). Behaviour
                               columns hist.<name> use the map of item.<name>.
  vocab/lookup.<group>.<field>.json
                               raw values of other fields given by this key field's raw value
                               (e.g. a movie's genre and release year, an asin's category):
                               {"key": "item.movie_id", "keys": [k0, ...],
                                "fields": {"item.genre": [g0, ...], ...}}
  vocab/encoders.json          {"version": 1, "note": "...", "fields": {field: encoder, ...}}:
                               how a field's raw value is computed from a raw quantity (bucket
                               edges, calendar unit, ...), below.

Encoders (`apply_encoder`), each {"kind": ..., "of": "<what the raw quantity is>", ...}:

  buckets      bucket b = number of `edges` <= x. With "names": the token names[b] (a missing x:
               the token "missing"), looked up in the field's vocabulary. Without: the id
               first_id + b (a missing x: first_id + "missing_bucket").
  calendar     x = Unix seconds; the UTC "year" ("2013"), "month" ("1".."12"), "weekday"
               ("0".."6", Monday = 0) or "hour" ("0".."23") as a token.
  year_span    x = a year; the token "<s>-<s + width - 1>" with s = floor(x / width) * width, or
               "missing" if x is missing.
  prefix       the first `length` characters of str(x).strip().
  standardise  a numeric field: (x - mean) / std as float32.
  rule         documentation only ("rule": text); the raw value is given (e.g. by a lookup).
  hash         a categorical field without a vocabulary file (`stable_hash`): the id
               first_id + stable_hash(str(x)) mod `buckets`, so a value never seen in training
               still gets its own id, not OOV_ID; a missing x is OOV_ID, and hist.<name> is
               hashed as item.<name> is. "function" names the hash (HASH_FUNCTION); the
               schema's vocab_size is first_id + buckets.

A field without an encoder is looked up in its vocabulary as str(raw value).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError

VOCAB_DIR = schema_lib.VOCAB_DIR
ENCODERS_FILE = "encoders.json"
ENCODERS_VERSION = 1
_CALENDAR_UNITS = ("year", "month", "weekday", "hour")
_SECONDS_PER_DAY = 86400
HASH_FUNCTION = "blake2b-8-le mod buckets"  # `stable_hash`, as encoders.json names it
_HASH_DIGEST_BYTES = 8  # a uint64
# Ids are int32: the largest hashed field has ids up to NUM_RESERVED_IDS + MAX_HASH_BUCKETS - 1.
MAX_HASH_BUCKETS = int(np.iinfo(np.int32).max) + 1 - schema_lib.NUM_RESERVED_IDS


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """The raw-value -> id map of one field: values[k] has id first_id + k."""
  field: str  # "<group>.<name>", e.g. "item.item_id"
  values: tuple[str, ...]
  first_id: int = schema_lib.NUM_RESERVED_IDS

  @functools.cached_property
  def ids(self) -> dict[str, int]:
    return {v: self.first_id + k for k, v in enumerate(self.values)}

  @property
  def size(self) -> int:
    """Number of ids, the reserved ones included (the schema's vocab_size)."""
    return self.first_id + len(self.values)

  def encode(self, values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """Raw values -> (int32 ids [N], number of values mapped to OOV_ID).

    A value is looked up as str(value); unseen and missing values (None, NaN) map to OOV_ID and
    are counted.
    """
    ids = self.ids
    out = np.fromiter((schema_lib.OOV_ID if t is None else ids.get(t, schema_lib.OOV_ID)
                       for t in tokens(values)), np.int32)
    return out, int(np.count_nonzero(out == schema_lib.OOV_ID))


def stable_hash(token: str) -> int:
  """A string -> an int in [0, 2**64), the same in every process, Python version and machine
  (unlike hash()): its UTF-8 bytes (lone surrogates, as undecodable input bytes are kept,
  encoded as such: "surrogatepass") -> the 8-byte BLAKE2b digest, read little-endian.

  mian_jax/serving.py holds a copy (it imports nothing from mian_jax.data); a test checks that
  the two agree.
  """
  digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"),
                           digest_size=_HASH_DIGEST_BYTES).digest()
  return int.from_bytes(digest, "little")


def hash_ids(token_list: Sequence[str | None], buckets: int,
             first_id: int = schema_lib.NUM_RESERVED_IDS) -> np.ndarray:
  """Tokens [N] (`tokens`; None = missing) -> int32 ids [N]: first_id + stable_hash(token) mod
  buckets, OOV_ID for a missing one. Each distinct token is hashed once."""
  ids = {t: first_id + stable_hash(t) % buckets for t in set(token_list) if t is not None}
  return np.fromiter((schema_lib.OOV_ID if t is None else ids[t] for t in token_list), np.int32,
                     count=len(token_list))


def hash_encoder(buckets: int, of: str) -> dict[str, Any]:
  """The encoders.json entry of a field hashed into `buckets` ids; `of` = what x is."""
  return {"kind": "hash", "buckets": int(buckets), "first_id": schema_lib.NUM_RESERVED_IDS,
          "function": HASH_FUNCTION, "of": of}


def _check_hash_encoder(encoder: Mapping[str, Any]) -> None:
  if encoder.get("function") != HASH_FUNCTION:
    raise DataError(f"encoder {dict(encoder)}: hash function {encoder.get('function')!r} is not "
                    f"the one this version computes ({HASH_FUNCTION!r}); prepare the data again")


@dataclasses.dataclass(frozen=True)
class HashedVocabulary:
  """The ids of a hashed field (encoder kind "hash"): first_id + stable_hash(str(value)) mod
  buckets; no values are kept, and no value is unseen. Encodes like a Vocabulary."""
  field: str
  buckets: int
  first_id: int = schema_lib.NUM_RESERVED_IDS

  @property
  def size(self) -> int:
    """Number of ids, the reserved ones included (the schema's vocab_size)."""
    return self.first_id + self.buckets

  def encode(self, values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """Raw values -> (int32 ids [N], number of missing values (None, NaN), mapped to OOV_ID)."""
    out = hash_ids(tokens(values), self.buckets, self.first_id)
    return out, int(np.count_nonzero(out == schema_lib.OOV_ID))


def tokens(values: Iterable[Any]) -> list[str | None]:
  """Raw values as the strings vocabularies hold (str(value)); missing values as None."""
  return [None if _missing(v) else str(v) for v in values]


def _missing(value: Any) -> bool:
  try:
    return value is None or bool(value != value)  # NaN, NaT
  except TypeError:  # pandas.NA: a comparison with it has no truth value
    return True


def _json_value(value: Any) -> Any:
  """A raw value as JSON: numpy scalars as Python numbers, NaN as null."""
  if _missing(value):
    return None
  return value.item() if isinstance(value, np.generic) else value


def _write_json(path: str, content: Any) -> None:
  # ensure_ascii (the default) writes undecodable bytes kept as lone surrogates (amazon.py) as
  # \udcXX escapes, which read back to the same strings.
  with open(path, "w") as f:
    json.dump(content, f, separators=(",", ":"), sort_keys=True)


def write_vocabularies(directory: str, vocabularies: Mapping[str, Sequence[Any]],
                       encoders: Mapping[str, Mapping[str, Any]] | None = None,
                       lookups: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
                       note: str = "") -> None:
  """Writes `directory`/vocab/ (see the module docstring); called by the sources on the
  temporary directory that `schema.write_prepared` then checksums and publishes.

  Args:
    directory: the (temporary) prepared directory.
    vocabularies: field -> its values in id order (the first has id 2); values become strings.
    encoders: field -> encoder (module docstring), for fields computed from a raw quantity.
    lookups: key field -> {"keys": raw key values, field: the raw value of `field` per key}.
    note: free text recorded in encoders.json (e.g. where the raw values come from).
  """
  out = os.path.join(directory, VOCAB_DIR)
  os.makedirs(out)
  for field, values in vocabularies.items():
    _write_json(os.path.join(out, f"{field}.json"),
                {"field": field, "first_id": schema_lib.NUM_RESERVED_IDS,
                 "values": [str(_json_value(v)) for v in values]})
  for key, table in (lookups or {}).items():
    keys = [str(_json_value(k)) for k in table["keys"]]
    fields = {f: [_json_value(v) for v in vals] for f, vals in table.items() if f != "keys"}
    for f, vals in fields.items():
      if len(vals) != len(keys):
        raise ValueError(f"lookup {key}: {len(vals)} values of {f} for {len(keys)} keys")
    _write_json(os.path.join(out, f"lookup.{key}.json"),
                {"key": key, "keys": keys, "fields": fields})
  _write_json(os.path.join(out, ENCODERS_FILE),
              {"version": ENCODERS_VERSION, "note": note, "fields": dict(encoders or {})})


def _vocab_dir(directory: str) -> str:
  """directory/vocab; DataError (one line) if it is missing: deleted or damaged after
  preparation, or never written (a directory prepared before vocabularies were saved)."""
  path = os.path.join(directory, VOCAB_DIR)
  if os.path.isfile(os.path.join(path, ENCODERS_FILE)):
    return path
  schema_lib.read_schema(directory)  # a missing or foreign directory says so first
  again = ("delete it, then python -m mian_jax.prepare --config=<config> "
           "--config.data.prepared_dir=<it>")
  if os.path.isdir(path):
    raise DataError(f"{os.path.join(path, ENCODERS_FILE)} is missing: the vocabularies of "
                    f"{directory} are incomplete; prepare it again ({again})")
  try:
    schema_lib.verify_dataset_checksum(directory)
  except DataError:  # the recorded checksum covered a vocab/ that is gone
    raise DataError(f"{path} is missing: it was deleted after preparation; prepare "
                    f"{directory} again ({again})") from None
  raise DataError(f"{directory} was prepared before vocabularies were saved; prepare it again "
                  f"({again})")


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: unreadable ({e}); delete the prepared directory and prepare it "
                    "again") from None


def load_vocabularies(directory: str) -> dict[str, Vocabulary | HashedVocabulary]:
  """field ("item.item_id") -> Vocabulary of a prepared directory, checked against its schema;
  a hashed field (encoder kind "hash", no file) -> its HashedVocabulary.

  Raises DataError with a one-line reason, e.g. for a directory prepared before vocabularies
  were saved (such a directory still trains and evaluates; only this call needs them).
  """
  path = _vocab_dir(directory)
  schema = schema_lib.read_schema(directory)
  sizes = {f"{group}.{x.name}": x.vocab_size
           for group, fields in (("item", schema.features.item_fields),
                                 ("user", schema.features.user_fields),
                                 ("context", schema.features.context_fields))
           for x in fields if x.is_categorical}
  out = {}
  for name in sorted(os.listdir(path)):
    field = name.removesuffix(".json")
    if name == ENCODERS_FILE or name.startswith("lookup.") or field not in sizes:
      continue
    d = _read_json(os.path.join(path, name))
    vocabulary = Vocabulary(field, tuple(d["values"]), int(d["first_id"]))
    if vocabulary.size > sizes[field]:
      raise DataError(f"{path}/{name}: {len(vocabulary.values)} values from id "
                      f"{vocabulary.first_id} exceed the schema's vocab_size {sizes[field]}")
    out[field] = vocabulary
  for field, encoder in load_encoders(directory).items():
    if encoder["kind"] == "hash" and field in sizes:
      _check_hash_encoder(encoder)
      hashed = HashedVocabulary(field, int(encoder["buckets"]), int(encoder["first_id"]))
      if hashed.size != sizes[field]:
        raise DataError(f"{path}/{ENCODERS_FILE}: {field} is hashed into {hashed.buckets} "
                        f"buckets from id {hashed.first_id}, but the schema's vocab_size is "
                        f"{sizes[field]}")
      out[field] = hashed
  return out


def load_encoders(directory: str) -> dict[str, dict[str, Any]]:
  """field -> encoder (module docstring) of a prepared directory."""
  return _read_json(os.path.join(_vocab_dir(directory), ENCODERS_FILE))["fields"]


@dataclasses.dataclass(frozen=True)
class Lookup:
  """Raw values of fields given by the raw value of a key field (e.g. an asin's category)."""
  key: str
  keys: tuple[str, ...]
  fields: dict[str, list[Any]]

  @functools.cached_property
  def _row(self) -> dict[str, int]:
    return {k: i for i, k in enumerate(self.keys)}

  def get(self, field: str, keys: Iterable[Any]) -> list[Any]:
    """The raw value of `field` for each key (as str(key)); None for an unknown key."""
    values, row = self.fields[field], self._row
    return [None if t is None or t not in row else values[row[t]] for t in tokens(keys)]


def load_lookups(directory: str) -> dict[str, Lookup]:
  """key field -> Lookup of a prepared directory (empty if its source needs none)."""
  path = _vocab_dir(directory)
  out = {}
  for name in sorted(os.listdir(path)):
    if name.startswith("lookup."):
      d = _read_json(os.path.join(path, name))
      out[d["key"]] = Lookup(d["key"], tuple(d["keys"]), d["fields"])
  return out


def _calendar(unit: str, seconds: np.ndarray) -> np.ndarray:
  s = np.floor(seconds).astype(np.int64)
  days = np.floor_divide(s, _SECONDS_PER_DAY)
  if unit == "year":
    return days.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970
  if unit == "month":
    return days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1
  if unit == "weekday":
    return (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
  return np.floor_divide(s, 3600) % 24


def apply_encoder(encoder: Mapping[str, Any], raw: Sequence[Any]) -> np.ndarray:
  """Raw quantities [N] -> tokens (object [N], None = missing) to look up in the field's
  vocabulary, or, for id-valued buckets and hash, int32 ids, or, for standardise, float32
  values."""
  kind = encoder["kind"]
  if kind == "hash":
    _check_hash_encoder(encoder)
    return hash_ids(tokens(raw), int(encoder["buckets"]), int(encoder["first_id"]))
  if kind == "prefix":
    return np.asarray([None if t is None else t.strip()[:encoder["length"]]
                       for t in tokens(raw)], dtype=object)
  if kind == "rule":
    return np.asarray(tokens(raw), dtype=object)
  x = np.asarray([np.nan if _missing(v) else float(v) for v in raw], np.float64)
  missing = np.isnan(x)
  if kind == "buckets":
    bucket = np.searchsorted(np.asarray(encoder["edges"], np.float64), np.nan_to_num(x),
                             side="right")
    if "names" in encoder:
      names = np.asarray(encoder["names"], dtype=object)[bucket]
      return np.where(missing, encoder.get("missing"), names)
    bucket = np.where(missing, encoder.get("missing_bucket", -1), bucket)
    if (bucket < 0).any():
      raise DataError(f"encoder {encoder}: a missing value has no bucket")
    return (bucket + encoder["first_id"]).astype(np.int32)
  if kind == "calendar":
    if encoder["unit"] not in _CALENDAR_UNITS:
      raise DataError(f"encoder {encoder}: unit must be one of {_CALENDAR_UNITS}")
    values = _calendar(encoder["unit"], np.nan_to_num(x))
    return np.where(missing, None, values.astype(str).astype(object))
  if kind == "year_span":
    width = int(encoder["width"])
    start = (np.floor(np.nan_to_num(x) / width) * width).astype(np.int64)
    spans = np.char.add(np.char.add(start.astype(str), "-"), (start + width - 1).astype(str))
    return np.where(missing, encoder["missing"], spans.astype(object))
  if kind == "standardise":
    return ((x - encoder["mean"]) / encoder["std"]).astype(np.float32)
  raise DataError(f"unknown encoder kind {kind!r} (expected buckets, calendar, year_span, "
                  "prefix, standardise, rule or hash)")


def encode_field(vocabularies: Mapping[str, Vocabulary | HashedVocabulary],
                 encoders: Mapping[str, Mapping[str, Any]], field: str,
                 raw: Sequence[Any]) -> tuple[np.ndarray, int]:
  """A field's raw values [N] -> (its prepared column [N], number of values mapped to OOV_ID).

  The field's encoder, if any, is applied first; then its vocabulary, unless the encoder
  already gives ids (id-valued buckets, hash: only a missing value is OOV_ID there) or values
  (standardise).
  """
  encoder = encoders.get(field)
  values = raw if encoder is None else apply_encoder(encoder, raw)
  if encoder is not None and values.dtype != object:
    oov = np.count_nonzero(values == schema_lib.OOV_ID) if values.dtype == np.int32 else 0
    return values, int(oov)
  if field not in vocabularies:
    raise DataError(f"no vocabulary or encoder for field {field!r} (known: "
                    f"{sorted(set(vocabularies) | set(encoders))})")
  return vocabularies[field].encode(values)
