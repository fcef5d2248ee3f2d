"""How raw values become ids, with NumPy only: shared by the prepared data (`data/vocab.py`, which
documents the encoders) and the export's loader (`serving.py`), which must not import the data
package."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mian_jax.errors import DataError

OOV_ID = 1  # the id of an unseen or missing value (0 pads behaviours: data/schema.py)
FIRST_ID = 2  # the first id of a value (data/schema.py: NUM_RESERVED_IDS)
HASH_FUNCTION = "blake2b-8-le mod buckets"  # `stable_hash`, as encoders.json names it
ENCODERS_FILE = "encoders.json"  # in vocab/: {"version", "note", "fields": {field: encoder}}
LOOKUP_PREFIX = "lookup."  # vocab/lookup.<key field>.json


def missing(value: Any) -> bool:
  try:
    return value is None or bool(value != value)  # NaN, NaT
  except (TypeError, ValueError):  # pandas.NA: a comparison with it has no truth value
    return True


def tokens(values: Iterable[Any]) -> list[str | None]:
  """Raw values as the strings vocabularies hold (str(value)); missing values as None."""
  return [None if missing(v) else str(v) for v in values]


def stable_hash(token: str) -> int:
  """A string -> an int in [0, 2**64), the same on every process and machine (unlike hash()): the
  8-byte BLAKE2b digest, little-endian, of its UTF-8 bytes (lone surrogates passed through)."""
  digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def hash_ids(token_list: Sequence[str | None], buckets: int,
             first_id: int = FIRST_ID) -> np.ndarray:
  """Tokens [N] (None = missing) -> int32 ids [N]: first_id + stable_hash(token) mod buckets,
  OOV_ID for a missing one. Each distinct token is hashed once."""
  ids = {t: first_id + stable_hash(t) % buckets for t in set(token_list) if t is not None}
  return np.fromiter((OOV_ID if t is None else ids[t] for t in token_list), np.int32,
                     count=len(token_list))


def check_hash_encoder(encoder: Mapping[str, Any]) -> None:
  if encoder.get("function") != HASH_FUNCTION:
    raise DataError(f"encoder {dict(encoder)}: hash function {encoder.get('function')!r} is not "
                    f"the one this version computes ({HASH_FUNCTION!r}); prepare the data again")


def _count_oov(ids: np.ndarray) -> tuple[np.ndarray, int]:
  return ids, int(np.count_nonzero(ids == OOV_ID))


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """The raw-value -> id map of one field: values[k] has id first_id + k."""
  field: str  # "<group>.<name>", e.g. "item.item_id"
  values: tuple[str, ...]
  first_id: int = FIRST_ID

  @functools.cached_property
  def ids(self) -> dict[str, int]:
    return {v: self.first_id + k for k, v in enumerate(self.values)}

  @property
  def size(self) -> int:
    """Number of ids, the reserved ones included (the schema's vocab_size)."""
    return self.first_id + len(self.values)

  def encode(self, values: Iterable[Any]) -> tuple[np.ndarray, int]:
    """Raw values (as str(value)) -> (int32 ids [N], number of unseen or missing ones: OOV_ID)."""
    ids = self.ids  # None (missing) is not a key
    return _count_oov(np.fromiter((ids.get(t, OOV_ID) for t in tokens(values)), np.int32))


@dataclasses.dataclass(frozen=True)
class HashedVocabulary:
  """A hashed field (encoder kind "hash"): ids first_id + stable_hash(str(value)) mod buckets."""
  field: str
  buckets: int
  first_id: int = FIRST_ID

  @property
  def size(self) -> int:
    return self.first_id + self.buckets

  def encode(self, values: Iterable[Any]) -> tuple[np.ndarray, int]:
    return _count_oov(hash_ids(tokens(values), self.buckets, self.first_id))


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


def read_lookups(vocab_dir: str, read_json) -> dict[str, Lookup]:
  """key field -> Lookup of the vocab/lookup.<key>.json files, read with `read_json`."""
  contents = [read_json(os.path.join(vocab_dir, name)) for name in sorted(os.listdir(vocab_dir))
              if name.startswith(LOOKUP_PREFIX)]
  return {c["key"]: Lookup(c["key"], tuple(c["keys"]), c["fields"]) for c in contents}


def calendar(unit: str, seconds: np.ndarray) -> np.ndarray:
  """UTC year, month 1..12, weekday 0..6 (Monday = 0) or hour of Unix seconds [N] (int64)."""
  s = np.floor(seconds).astype(np.int64)
  days = np.floor_divide(s, 86400)
  if unit == "year":
    return days.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970
  if unit == "month":
    return days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1
  if unit == "weekday":
    return (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
  if unit == "hour":
    return np.floor_divide(s, 3600) % 24
  raise DataError(f"calendar unit {unit!r}: expected year, month, weekday or hour")


def apply_encoder(encoder: Mapping[str, Any], raw: Sequence[Any]) -> np.ndarray:
  """Raw quantities [N] -> tokens (object [N], None = missing) to look up in a vocabulary, or
  int32 ids (id-valued buckets, hash), or float32 values (standardise)."""
  kind = encoder["kind"]
  if kind == "hash":
    check_hash_encoder(encoder)
    return hash_ids(tokens(raw), int(encoder["buckets"]), int(encoder["first_id"]))
  if kind == "prefix":
    return np.asarray([None if t is None else t.strip()[:encoder["length"]]
                       for t in tokens(raw)], dtype=object)
  if kind == "rule":
    return np.asarray(tokens(raw), dtype=object)
  try:
    x = np.asarray([np.nan if missing(v) else float(v) for v in raw], np.float64)
  except (TypeError, ValueError):
    raise DataError(f"a value of a field computed with a {kind!r} encoder ({encoder.get('of')}) "
                    "is not a number") from None
  is_missing = np.isnan(x)
  if kind == "buckets":
    bucket = np.searchsorted(np.asarray(encoder["edges"], np.float64), np.nan_to_num(x),
                             side="right")
    if "names" in encoder:
      names = np.asarray(encoder["names"], dtype=object)[bucket]
      return np.where(is_missing, encoder.get("missing"), names)
    bucket = np.where(is_missing, encoder.get("missing_bucket", -1), bucket)
    if (bucket < 0).any():
      raise DataError(f"encoder {encoder}: a missing value has no bucket")
    return (bucket + encoder["first_id"]).astype(np.int32)
  if kind == "calendar":
    values = calendar(encoder["unit"], np.nan_to_num(x))
    return np.where(is_missing, None, values.astype(str).astype(object))
  if kind == "year_span":
    width = int(encoder["width"])
    start = (np.floor(np.nan_to_num(x) / width) * width).astype(np.int64)
    spans = np.char.add(np.char.add(start.astype(str), "-"), (start + width - 1).astype(str))
    return np.where(is_missing, encoder["missing"], spans.astype(object))
  if kind == "standardise":
    return ((x - encoder["mean"]) / encoder["std"]).astype(np.float32)
  raise DataError(f"unknown encoder kind {kind!r} (expected buckets, calendar, year_span, "
                  "prefix, standardise, rule or hash)")


def encode_field(field: str, vocabulary: Vocabulary | HashedVocabulary | None,
                 encoder: Mapping[str, Any] | None, raw: Sequence[Any]) -> tuple[np.ndarray, int]:
  """A field's raw values [N] -> (its column [N], number of values mapped to OOV_ID): its
  encoder, if any, then its vocabulary unless the encoder gives ids or values."""
  values = raw if encoder is None else apply_encoder(encoder, raw)
  if encoder is not None and values.dtype != object:
    return _count_oov(values) if values.dtype == np.int32 else (values, 0)
  if vocabulary is None:
    raise DataError(f"no vocabulary or encoder for field {field!r}")
  return vocabulary.encode(values)
