"""The small file helpers: atomic writes leave the old file or the new one, never a part; the
metrics file writes a non-finite value as null and reads it back as NaN; one Markdown table."""

import hashlib
import json
import math
import os

import pytest

from mian_jax import fileio, writers


def test_atomic_path_replaces_on_success_and_leaves_the_old_file_on_failure(tmp_path):
  path = str(tmp_path / "out.txt")
  fileio.write_text_atomic(path, "old")
  with pytest.raises(RuntimeError), fileio.atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write("half")
    raise RuntimeError("killed mid-write")
  assert open(path).read() == "old" and os.listdir(tmp_path) == ["out.txt"]
  fileio.write_text_atomic(path, "new", fsync=True)
  assert open(path).read() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
  data = os.urandom(3 << 20) + b"tail"  # more than one chunk would be at 1 MiB
  (tmp_path / "f").write_bytes(data)
  assert fileio.sha256_file(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()


def test_metrics_jsonl_writes_non_finite_values_as_null_and_reads_them_as_nan(tmp_path):
  writer = writers.MetricWriter(str(tmp_path))
  writer.write_scalars(3, {"loss": float("nan"), "auc": 0.5, "gap": float("inf")})
  writer.write_hparams({"seed": 1})
  writer.close()
  row = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert row["loss"] is None and row["gap"] is None and row["auc"] == 0.5
  (read,) = writers.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert math.isnan(read["loss"]) and read["auc"] == 0.5 and read["step"] == 3
  assert json.loads((tmp_path / "hparams.json").read_text()) == {"seed": 1}
  assert sorted(p for p in os.listdir(tmp_path) if ".tmp" in p) == []


def test_markdown_table_aligns_numbers_and_shows_missing_values():
  table = writers.markdown_table(["name", "auc"], [["a|b", 0.71234], ["c", float("nan")]],
                                 [False, True], missing="n/a")
  assert table == "| name | auc |\n|---|---:|\n| a\\|b | 0.7123 |\n| c | n/a |\n"
  assert writers.hms(3725.0) == "01:02:05" and writers.hms(float("inf")) == "?"
