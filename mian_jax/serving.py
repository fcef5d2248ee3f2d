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


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path} is missing: {os.path.dirname(path)} is not an export directory "
                     "(python -m mian_jax.export)") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def file_sha256(path: str) -> str:
  """SHA-256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


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

  @classmethod
  def load(cls, export_dir: str, device: jax.Device | None = None) -> Scorer:
    """Reads an export directory, checks its files against the manifest's checksums and puts
    the parameters on `device` (default: the first device).

    Raises:
      ValueError: not an export directory, a damaged file, an unsupported format, or an
        export that was not lowered for this process's platform.
    """
    manifest = _read_json(os.path.join(export_dir, MANIFEST_FILE))
    signature = _read_json(os.path.join(export_dir, SIGNATURE_FILE))
    for name, content in ((MANIFEST_FILE, manifest), (SIGNATURE_FILE, signature)):
      if content.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{os.path.join(export_dir, name)} has format_version "
                         f"{content.get('format_version')!r}; this loader reads "
                         f"{FORMAT_VERSION}: export the checkpoint again")
    for name, expected in manifest.get("sha256", {}).items():
      path = os.path.join(export_dir, name)
      if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: the export directory is incomplete")
      if file_sha256(path) != expected:
        raise ValueError(f"{path} differs from the checksum in {MANIFEST_FILE}: the export "
                         "is damaged; export the checkpoint again")
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
        behavior_rows="clicks", the items the user clicked). `label`, `weight`, `group_id`
        may be present and are ignored.

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
        unknown field, fields of different lengths, behaviour lists of unequal length, a
        numeric value that is missing or not a number, a field whose encoder this loader
        does not apply (exports of sources other than tabular and synthetic).
    """
    if self.vocab_dir is None:
      raise ValueError(f"{self.export_dir} has no {VOCAB_DIR}/ (its data were prepared before "
                       "vocabularies were saved): encode the ids yourself")
    wanted = [name for name in self._inputs if name != "hist_len"]
    unknown = sorted(k for k in records if k not in wanted and k not in self._ignored)
    if unknown:
      raise ValueError(f"unknown field {unknown[0]!r}; encode takes {', '.join(wanted)}")
    for name in wanted:
      if name not in records:
        raise ValueError(f"field {name!r} is missing; encode takes {', '.join(wanted)}")
      if len(records[name]) != len(records[wanted[0]]):
        raise ValueError(f"field {name!r} has {len(records[name])} rows but {wanted[0]!r} has "
                         f"{len(records[wanted[0]])}")
    num_rows = len(records[wanted[0]]) if wanted else 0
    hist = [name for name in wanted if name.startswith("hist.")]
    batch, unseen = {}, {}
    for name in wanted:
      if name in hist:
        continue
      if self._inputs[name]["dtype"] == "int32":
        batch[name], unseen[name] = self._lookup(name, name, _tokens(records[name]))
      else:
        batch[name] = self._standardise(name, records[name])
    max_len = self._inputs[hist[0]]["shape"][0] if hist else 0
    lengths = np.zeros(num_rows, np.int32)
    for name in hist:
      lists = [list(x) if x is not None else [] for x in records[name]]
      kept = [x[len(x) - max_len:] if len(x) > max_len else x for x in lists]
      row_lengths = np.asarray([len(x) for x in kept], np.int32)
      if name != hist[0] and (row_lengths != lengths).any():
        raise ValueError(f"behaviour lists {name!r} and {hist[0]!r} differ in length in row "
                         f"{int(np.argmax(row_lengths != lengths))}")
      lengths = row_lengths
      flat = [v for x in kept for v in reversed(x)]  # newest first
      ids, unseen[name] = self._lookup(name, f"item.{name[len('hist.'):]}", _tokens(flat))
      column = np.zeros((num_rows, max_len), np.int32)
      column[np.arange(max_len)[None, :] < lengths[:, None]] = ids
      batch[name] = column
    batch["hist_len"] = lengths
    return batch, unseen

  def _lookup(self, name: str, field: str, tokens: list[str | None]) -> tuple[np.ndarray, int]:
    """Tokens -> int32 ids of `field`'s map, or its hash (encoder kind "hash"), with OOV_ID
    for an unseen (not hashed) or missing token, and how many were OOV_ID."""
    encoder = self._encoders().get(field)
    kind = None if encoder is None else encoder.get("kind")
    if kind == "hash":
      if encoder.get("function") != HASH_FUNCTION:
        raise ValueError(f"field {name!r} is hashed with {encoder.get('function')!r}; this "
                         f"loader computes {HASH_FUNCTION!r}")
      out = _hash_ids(tokens, int(encoder["buckets"]), int(encoder["first_id"]))
    elif kind in (None, "rule"):
      ids = self._vocabulary(field)
      out = np.fromiter((OOV_ID if t is None else ids.get(t, OOV_ID) for t in tokens),
                        np.int32, count=len(tokens))
    else:
      raise ValueError(f"field {name!r} is computed with a {kind!r} encoder, which "
                       "Scorer.encode does not apply; encode it yourself "
                       "(mian_jax/data/vocab.py)")
    return out, int(np.count_nonzero(out == OOV_ID))

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
