"""Scores with an exported model (`python -m mian_jax.export`), needing only jax and numpy.

  scorer = Scorer.load("exports/synthetic")
  batch, unseen = scorer.encode({"item.item_id": ["i1", "i7"], "hist.item_id": [["i3"], []], ...})
  out = scorer.score(batch)  # {"prob": [B], "attention.<module>": [B, n]}

No Flax, no model code, no config library; docs/serving.md says what each method accepts.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mian_jax import encoding, fileio

FORMAT_VERSION = 1  # of the export directory (mian_jax/export.py)
EXPORT_FILE = "model.jaxexport"
PARAMS_FILE = "params.npz"
SIGNATURE_FILE = "signature.json"
MANIFEST_FILE = "manifest.json"
VOCAB_DIR = "vocab"


def _read_json(path: str, versioned: bool = False) -> dict[str, Any]:
  try:
    with open(path) as f:
      content = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path} is missing: {os.path.dirname(path)} is not an export directory "
                     "(python -m mian_jax.export)") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
  if versioned and content.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {content.get('format_version')!r}; this "
                     f"loader reads {FORMAT_VERSION}: export the checkpoint again")
  return content


def checksums(export_dir: str) -> dict[str, str]:
  """{path: SHA-256} of every file of an export directory but manifest.json."""
  return fileio.sha256_files(export_dir, skip=MANIFEST_FILE)


def check_files(export_dir: str, manifest: Mapping[str, Any]) -> None:
  """ValueError (one line, naming the file) unless `export_dir` holds the manifest's checksums."""
  expected, actual = manifest.get("sha256", {}), checksums(export_dir)
  for name in sorted({*expected, *actual}):
    path = os.path.join(export_dir, *name.split("/"))
    if name not in expected:
      raise ValueError(f"{path} is not covered by the checksums in {MANIFEST_FILE}: a file was "
                       "added to the export, or it was written by an older version; export the "
                       "checkpoint again")
    if name not in actual:
      raise ValueError(f"{path} is missing: the export directory is incomplete; export the "
                       "checkpoint again")
    if actual[name] != expected[name]:
      raise ValueError(f"{path} differs from the checksum in {MANIFEST_FILE}: the export "
                       "was changed or damaged; export the checkpoint again")


def _check_sequence(value: Any, what: str, holding: str) -> None:
  """ValueError unless `value` is a sequence other than a string (read "i1" as "i" and "1")."""
  if isinstance(value, (str, bytes)):
    raise ValueError(f"{what} is a string ({value[:40]!r}); give a list of {holding}, e.g. "
                     f"[{value[:40]!r}]")
  if not hasattr(value, "__len__"):
    raise ValueError(f"{what} is a {type(value).__name__}; give a list of {holding}")


def _item_field(name: str) -> str:
  """The field whose vocabulary encodes an input: item.<name> for hist.<name>."""
  return f"item.{name[len('hist.'):]}" if name.startswith("hist.") else name


class Scorer:
  """An exported model, ready to score encoded batches on this process's default device; its
  `signature` and `manifest` are those files' content, `vocab_dir` its vocab/ (or None)."""

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
    self.input_names = tuple(self._inputs)
    self.output_names = tuple(x["name"] for x in self.signature["outputs"])
    self._call = jax.jit(exported.call)

  @classmethod
  def load(cls, export_dir: str, device: jax.Device | None = None) -> Scorer:
    """An export directory, every file checked against the manifest, its parameters on `device`
    (default: the first); ValueError (one line) for what is not an export of this platform."""
    manifest = _read_json(os.path.join(export_dir, MANIFEST_FILE), versioned=True)
    check_files(export_dir, manifest)
    signature = _read_json(os.path.join(export_dir, SIGNATURE_FILE), versioned=True)
    backend = jax.default_backend()
    running = ("cuda", "rocm") if backend == "gpu" else (backend,)  # as `jax.export` names them
    exported_for = tuple(manifest.get("platforms", ()))
    if not set(running) & set(exported_for):
      raise ValueError(f"{export_dir} was exported for {','.join(exported_for)} but this "
                       f"process runs on {backend}; export again with "
                       f"--platforms={','.join((*exported_for, running[0]))}")
    with open(os.path.join(export_dir, EXPORT_FILE), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    device = device or jax.devices()[0]
    with np.load(os.path.join(export_dir, PARAMS_FILE), allow_pickle=False) as arrays:
      params = {name: jax.device_put(arrays[name], device) for name in arrays.files}
    return cls(export_dir, exported, params, signature, manifest)

  def encode(self, records: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """{input: B raw values, hist.<name>: B lists, oldest first} -> (the batch `score` takes,
    {field: unseen or missing values}) by vocab/ (docs/serving.md); `derived_fields` optional."""
    if self.vocab_dir is None:
      raise ValueError(f"{self.export_dir} has no {VOCAB_DIR}/ (its data were prepared before "
                       "vocabularies were saved): encode the ids yourself")
    wanted = [name for name in self._inputs if name != "hist_len"]
    if unknown := sorted(k for k in records if k not in wanted and k not in self._ignored):
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
    given = [name for name in required if name.startswith("hist.")]
    max_len = self._inputs[given[0]]["shape"][0] if given else 0
    raw = {name: records[name] for name in required if name not in given}
    lengths = np.zeros(num_rows, np.int32)
    for name in given:
      for row, x in enumerate(records[name]):
        if x is not None:
          _check_sequence(x, f"behaviour field {name!r} row {row}", "its behaviours")
      kept = [list(x)[-max_len:] if x is not None else [] for x in records[name]]  # T >= 1
      row_lengths = np.asarray([len(x) for x in kept], np.int32)
      if name != given[0] and (row_lengths != lengths).any():
        raise ValueError(f"behaviour lists {name!r} and {given[0]!r} differ in length in row "
                         f"{int(np.argmax(row_lengths != lengths))}")
      lengths, raw[name] = row_lengths, [v for x in kept for v in reversed(x)]  # newest first
    for name, (key, field) in derived.items():  # the lookup of hist.<key> is item.<key>'s
      raw[name] = self._lookups[_item_field(key)].get(field, raw[key])
    batch, unseen = {"hist_len": lengths}, {}
    for name in wanted:
      if self._inputs[name]["dtype"] != "int32":
        batch[name] = self._standardise(name, raw[name])
        continue
      field = _item_field(name)
      try:
        ids, unseen[name] = encoding.encode_field(field, self._vocabularies.get(field),
                                                  self._encoders.get(field), raw[name])
      except ValueError as e:
        raise ValueError(f"field {name!r}: {e}") from None
      if name.startswith("hist."):
        ids, flat = np.zeros((num_rows, max_len), np.int32), ids
        ids[np.arange(max_len)[None, :] < lengths[:, None]] = flat
      batch[name] = ids
    return batch, unseen

  def derived_fields(self) -> dict[str, tuple[str, str]]:
    """{input a lookup of vocab/ gives: (the input that is its key, the lookup's field)}, e.g.
    {"item.category": ("item.item_id", "item.category"), "hist.category": ("hist.item_id", ...)}."""
    out = {}
    for key, lookup in self._lookups.items():
      for field in lookup.fields:
        out[field] = (key, field)
        if field.startswith("item.") and key.startswith("item."):
          out[f"hist.{field[len('item.'):]}"] = (f"hist.{key[len('item.'):]}", field)
    return {name: source for name, source in out.items()
            if name in self._inputs and source[0] in self._inputs}

  @functools.cached_property
  def _lookups(self) -> dict[str, encoding.Lookup]:
    return encoding.read_lookups(self.vocab_dir, _read_json)

  def _standardise(self, name: str, values) -> np.ndarray:
    encoder = self._encoders.get(name, {})
    if encoder.get("kind") != "standardise":
      raise ValueError(f"numeric field {name!r} has no standardise encoder in "
                       f"{VOCAB_DIR}/{encoding.ENCODERS_FILE}; encode it yourself")
    try:
      x = encoding.apply_encoder(encoder, values)  # NaN for a missing value
    except ValueError:  # not a number
      x = np.asarray([np.nan])
    if not np.isfinite(x).all():
      raise ValueError(f"numeric field {name!r} holds a missing value or one that is not a "
                       "finite number")
    return x

  @functools.cached_property
  def _encoders(self) -> dict[str, Any]:
    return _read_json(os.path.join(self.vocab_dir, encoding.ENCODERS_FILE))["fields"]

  @functools.cached_property
  def _vocabularies(self) -> dict[str, encoding.Vocabulary]:
    """field -> vocab/<field>.json of the inputs' fields that have one (not hashed, computed)."""
    paths = {field: os.path.join(self.vocab_dir, f"{field}.json")
             for field in map(_item_field, self._inputs)}
    contents = {field: _read_json(path) for field, path in paths.items() if os.path.isfile(path)}
    return {field: encoding.Vocabulary(field, tuple(c["values"]), int(c["first_id"]))
            for field, c in contents.items()}

  def check_inputs(self, batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """(An encoded batch, flat {"item.item_id": [B], ...} or nested, checked against and cast to
    signature.json, B); a one-line ValueError naming the field for what does not fit."""
    flat = {k: v for k, v in batch.items() if not isinstance(v, Mapping)}
    flat.update({f"{key}.{name}": v for key, value in batch.items() if isinstance(value, Mapping)
                 for name, v in value.items()})
    if unknown := sorted(k for k in flat if k not in self._inputs and k not in self._ignored
                         and not k.startswith("extra.")):
      raise ValueError(f"unknown input {unknown[0]!r}; the model reads "
                       f"{', '.join(self._inputs)}")
    inputs = {}
    for name, spec in self._inputs.items():
      if name not in flat:
        raise ValueError(f"input {name!r} is missing ({spec['dtype']} of per-example shape "
                         f"{spec['shape']})")
      inputs[name] = self._check_input(name, spec, np.asarray(flat[name]))
      first = next(iter(inputs))
      if len(inputs[name]) != len(inputs[first]):
        raise ValueError(f"input {name!r} has {len(inputs[name])} rows but {first!r} has "
                         f"{len(inputs[first])}")
    return inputs, len(next(iter(inputs.values()), ()))

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
      low, high = spec.get("range", (-2**31, 2**31))  # int32
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
    """{"prob": [B], "attention.<module>": [B, n]} (float32) of an encoded batch (`check_inputs`),
    padded to a power of two: one compilation per power of two met."""
    inputs, num_rows = self.check_inputs(batch)
    if num_rows == 0:
      return {x["name"]: np.zeros((0, *x["shape"]), x["dtype"])
              for x in self.signature["outputs"]}
    padded = 1 << (num_rows - 1).bit_length()  # the smallest power of two >= num_rows
    if padded > num_rows:  # the pad rows repeat real ones
      index = np.arange(padded) % num_rows
      inputs = {name: array[index] for name, array in inputs.items()}
    out = jax.device_get(self._call(self._params, inputs))
    return {name: np.asarray(out[name])[:num_rows] for name in self.output_names}
