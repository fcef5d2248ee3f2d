"""Vocabularies kept with the prepared data (`<dir>/vocab/`), written and read: the format is in
docs/data.md, "Vocabularies"; the encoding itself, shared with the export, is `mian_jax.encoding`
(a field without an encoder is looked up in its vocabulary as str(raw value))."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mian_jax import encoding
from mian_jax.data import schema as schema_lib
from mian_jax.encoding import HashedVocabulary, Lookup, Vocabulary
from mian_jax.errors import DataError

ENCODERS_FILE = encoding.ENCODERS_FILE
ENCODERS_VERSION = 1
# Ids are int32: the largest hashed field has ids up to NUM_RESERVED_IDS + MAX_HASH_BUCKETS - 1.
MAX_HASH_BUCKETS = int(np.iinfo(np.int32).max) + 1 - schema_lib.NUM_RESERVED_IDS


def _json_value(value: Any) -> Any:
  """A raw value as JSON: numpy scalars as Python numbers, NaN as null."""
  if encoding.missing(value):
    return None
  return value.item() if isinstance(value, np.generic) else value


def _write_json(path: str, content: Any) -> None:
  # ensure_ascii: lone surrogates (undecodable bytes, amazon.py) as \udcXX escapes read back equal
  with open(path, "w") as f:
    json.dump(content, f, separators=(",", ":"), sort_keys=True)


def write_vocabularies(directory: str, vocabularies: Mapping[str, Sequence[Any]],
                       encoders: Mapping[str, Mapping[str, Any]] | None = None,
                       lookups: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
                       note: str = "") -> None:
  """Writes `directory`/vocab/ (in the temporary directory `schema.write_prepared` publishes):
  `vocabularies` (field -> values in id order from 2), `encoders` (field -> encoder), `lookups`
  (key field -> {"keys": raw keys, field: its raw value per key}) and a free-text `note`."""
  out = os.path.join(directory, schema_lib.VOCAB_DIR)
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
    _write_json(os.path.join(out, f"{encoding.LOOKUP_PREFIX}{key}.json"),
                {"key": key, "keys": keys, "fields": fields})
  _write_json(os.path.join(out, ENCODERS_FILE),
              {"version": ENCODERS_VERSION, "note": note, "fields": dict(encoders or {})})


def _vocab_dir(directory: str) -> str:
  """directory/vocab; a one-line DataError if it is missing (deleted, damaged or never written)."""
  path = os.path.join(directory, schema_lib.VOCAB_DIR)
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
  """field -> Vocabulary (or HashedVocabulary) of a prepared directory, checked by its schema."""
  path = _vocab_dir(directory)
  schema = schema_lib.read_schema(directory)
  sizes = {name: x.vocab_size for name, x in schema.features.fields().items() if x.is_categorical}
  out = {}
  for name in sorted(os.listdir(path)):
    field = name.removesuffix(".json")
    if name == ENCODERS_FILE or name.startswith(encoding.LOOKUP_PREFIX) or field not in sizes:
      continue
    d = _read_json(os.path.join(path, name))
    vocabulary = Vocabulary(field, tuple(d["values"]), int(d["first_id"]))
    if vocabulary.size > sizes[field]:
      raise DataError(f"{path}/{name}: {len(vocabulary.values)} values from id "
                      f"{vocabulary.first_id} exceed the schema's vocab_size {sizes[field]}")
    out[field] = vocabulary
  for field, encoder in load_encoders(directory).items():
    if encoder["kind"] == "hash" and field in sizes:
      encoding.check_hash_encoder(encoder)
      hashed = HashedVocabulary(field, int(encoder["buckets"]), int(encoder["first_id"]))
      if hashed.size != sizes[field]:
        raise DataError(f"{path}/{ENCODERS_FILE}: {field} is hashed into {hashed.buckets} buckets "
                        f"from id {hashed.first_id}, but the schema's vocab_size is {sizes[field]}")
      out[field] = hashed
  return out


def load_encoders(directory: str) -> dict[str, dict[str, Any]]:
  """field -> encoder (docs/data.md) of a prepared directory."""
  return _read_json(os.path.join(_vocab_dir(directory), ENCODERS_FILE))["fields"]


def load_lookups(directory: str) -> dict[str, Lookup]:
  """key field -> Lookup of a prepared directory (empty if its source needs none)."""
  return encoding.read_lookups(_vocab_dir(directory), _read_json)

