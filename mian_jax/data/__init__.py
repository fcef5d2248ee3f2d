"""Data sources and the prepared-data cache: `ensure_prepared` returns the prepared directory
of `config.data` (source "synthetic", "amazon", "amazon_like", "movielens", "tabular", or
"prepared": `data.prepared_dir` as it is), preparing it first if needed (docs/data.md)."""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os

from absl import logging
from ml_collections import ConfigDict

from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError
from mian_jax.fileio import cache_root, sha256_file, write_text_atomic

# source -> the module whose `prepare(data_config, directory)` writes it (imported on use).
PREPARERS = {source: f"mian_jax.data.{source}"
             for source in ("synthetic", "amazon", "amazon_like", "movielens", "tabular")}


# (source, protocol) -> the revision of splits changed within a format version (docs/data.md).
SPLIT_REVISIONS = {(source, protocol): 2 for source in ("amazon", "amazon_like")
                   for protocol in ("din", "dien")}


def settings_key(data_config: ConfigDict) -> str:
  """A short hash of every data setting except where the result is stored."""
  settings = {k: v for k, v in data_config.to_dict().items() if k != "prepared_dir"}
  settings["format_version"] = schema_lib.FORMAT_VERSION  # a new format is prepared anew
  if revision := SPLIT_REVISIONS.get((data_config.source, data_config.get("protocol"))):
    settings["split_revision"] = revision  # only there: other settings keep their cached copies
  blob = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepared_dir(data_config: ConfigDict, raw: dict | None = None) -> str:
  """`data.prepared_dir`, else `<cache>/prepared/<source>-<settings_key>[-<raw_key(raw)>]`."""
  if data_config.prepared_dir:
    return os.path.expanduser(data_config.prepared_dir)
  if data_config.source == "prepared":
    raise ConfigError("data.source='prepared' needs --config.data.prepared_dir=<directory>")
  name = f"{data_config.source}-{settings_key(data_config)}"
  return os.path.join(cache_root(), "prepared", f"{name}-{raw_key(raw)}" if raw else name)


# In a prepared directory: the raw files it was prepared from (outside the data's checksum).
RAW_MANIFEST = "raw_files.json"


def raw_manifest(paths: list[str]) -> dict:
  """{"algorithm", "files": [{"path", "bytes", "sha256"}]} of the raw files, in reading order."""
  files = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
           for p in paths]
  return {"algorithm": "sha256", "files": files}


def raw_key(manifest: dict) -> str:
  """12 hex digits of the raw files' contents in order (their paths do not enter)."""
  digests = "\n".join(f["sha256"] for f in manifest["files"])
  return hashlib.sha256(digests.encode()).hexdigest()[:12]


def describe_raw(manifest: dict) -> str:
  """"<path> (<bytes> bytes, sha256 <12 hex>), ..." for a log line."""
  return ", ".join(f"{f['path']} ({f['bytes']:,} bytes, sha256 {f['sha256'][:12]})"
                   for f in manifest["files"])


def read_raw_manifest(directory: str) -> dict | None:
  """A prepared directory's RAW_MANIFEST, or None if it has none (or it is unreadable)."""
  try:
    with open(os.path.join(directory, RAW_MANIFEST)) as f:
      manifest = json.load(f)
    return manifest if isinstance(manifest.get("files"), list) else None
  except (OSError, ValueError, AttributeError):
    return None


def _raw_files_or_copy(data_config: ConfigDict, module) -> tuple[dict | None, str | None]:
  """(raw_manifest, None); the raw files gone, (None, the one cached copy of these settings) or
  (None, None) for a prepared `data.prepared_dir`; else the DataError (after any download)."""
  try:
    return raw_manifest(module.raw_files(data_config, download=False)), None
  except DataError as missing:
    # Complete cache entries of these settings, whatever raw files they came from.
    prefix = os.path.join(cache_root(), "prepared",
                          f"{data_config.source}-{settings_key(data_config)}-")
    copies = [] if data_config.prepared_dir else sorted(
        os.path.dirname(p) for p in glob.glob(glob.escape(prefix) + "*/schema.json"))
    if len(copies) == 1:
      logging.warning("The raw files are missing (%s); using the data prepared from them before "
                      "in %s", missing, copies[0])
      return None, copies[0]
    if data_config.prepared_dir and os.path.isfile(
        os.path.join(os.path.expanduser(data_config.prepared_dir), "schema.json")):
      logging.warning("The raw files are missing (%s); using data.prepared_dir as it is", missing)
      return None, None
    if len(copies) > 1:
      raise DataError(f"{missing}; {len(copies)} prepared copies of these settings from "
                      f"different raw files remain ({', '.join(copies)}): restore the raw files, "
                      "or pick one with --config.data.prepared_dir") from None
  return raw_manifest(module.raw_files(data_config, download=True)), None


def ensure_prepared(data_config: ConfigDict) -> tuple[str, schema_lib.Schema]:
  """(directory, schema) of the prepared data, prepared first if needed (keyed by any raw files)."""
  module = (importlib.import_module(PREPARERS[data_config.source])
            if data_config.source in PREPARERS else None)
  raw, directory = (_raw_files_or_copy(data_config, module) if hasattr(module, "raw_files")
                    else (None, None))
  directory = directory or prepared_dir(data_config, raw)
  fresh = not os.path.isfile(os.path.join(directory, "schema.json"))
  if fresh:
    if data_config.source == "prepared":
      raise DataError(f"no prepared data at {directory} (missing schema.json)")
    if data_config.source not in PREPARERS:
      raise ConfigError(f"unknown data.source {data_config.source!r}; "
                        f"expected one of {sorted(PREPARERS) + ['prepared']}")
    if os.path.isdir(directory) and os.listdir(directory):  # never delete the user's directory
      if data_config.prepared_dir:
        raise DataError(f"data.prepared_dir={directory} holds files but no schema.json, so it is "
                        "no (complete) prepared data set; delete it to prepare it there again, "
                        "or choose another directory")
      if not os.path.isfile(os.path.join(directory, "schema.json")):  # not prepared meanwhile
        logging.warning("%s has no schema.json (a damaged cache entry); preparing it again",
                        directory)
        schema_lib.discard(directory)
    logging.info("Preparing %s data into %s", data_config.source, directory)
    module.prepare(data_config, directory)
  if raw is not None:
    recorded = None if fresh else read_raw_manifest(directory)
    if recorded is None and (fresh or not data_config.prepared_dir):  # a cache name holds its key
      write_text_atomic(os.path.join(directory, RAW_MANIFEST), json.dumps(raw, indent=2))
    elif recorded is None:
      logging.info("%s records no raw files (%s): not compared with %s", directory,
                   RAW_MANIFEST, describe_raw(raw))
    elif data_config.prepared_dir and raw_key(recorded) != raw_key(raw):
      raise DataError(f"data.prepared_dir={directory} was prepared from other raw files "
                      f"({describe_raw(recorded)}; now {describe_raw(raw)}); delete it to "
                      "prepare it again, or choose another directory")
    logging.info("Prepared data %s comes from %s", directory, describe_raw(raw))
  schema = schema_lib.read_schema(directory)
  if schema.features.max_seq_len != data_config.max_seq_len:
    raise DataError(f"{directory}: prepared with max_seq_len={schema.features.max_seq_len} "
                    f"but the config says data.max_seq_len={data_config.max_seq_len}")
  return directory, schema
