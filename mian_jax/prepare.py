"""Prepares a data set without training; prints its statistics and checksum.

  python -m mian_jax.prepare --config=configs/movielens.py \\
      [--config.data.prepared_dir=/data/prepared/ml100k]

An already prepared directory (docs/data.md) is not rebuilt: its checksum is recomputed and
must match the one in stats.json.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from mian_jax import cli, fileio
from mian_jax import data as data_lib
from mian_jax.data import schema as schema_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py[:arg]).",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def prepare_and_describe(data_config) -> tuple[str, dict]:
  """Prepares (if needed) and returns (directory, stats); stats.json holds the checksum."""
  directory, schema = data_lib.ensure_prepared(data_config)
  checksum = schema_lib.verify_dataset_checksum(directory)  # DataError if the data changed
  path = pathlib.Path(directory, "stats.json")
  stats = json.loads(path.read_text()) if path.is_file() else {}
  if "checksum" not in stats:  # sources that do not record it (e.g. synthetic)
    stats.setdefault("num_samples", {s: schema.size(s) for s in schema_lib.SPLITS})
    stats["checksum"] = checksum
    fileio.write_text_atomic(str(path), json.dumps(stats, indent=2, sort_keys=True))
  return directory, stats


def main(argv):
  cli.init_process(argv)
  directory, stats = cli.run_or_exit(prepare_and_describe, FLAGS.config.data)
  print(json.dumps(stats, indent=2, sort_keys=True))
  print(f"prepared directory: {directory}")
  print(f"checksum: {stats['checksum']}")
  raw = data_lib.read_raw_manifest(directory)
  for f in raw["files"] if raw else ():
    print(f"raw file: {f['path']} ({f['bytes']} bytes, sha256 {f['sha256']})")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
