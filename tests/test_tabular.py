"""Tabular source: a hand-worked CSV log (behaviours from earlier clicks), Parquet list columns
with pre-split files, bad rows and configuration errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import tabular as tabular_config
from mian_jax import data as data_lib
from mian_jax import encoding, fileio
from mian_jax.data import schema as schema_lib
from mian_jax.data import records, tabular, vocab
from mian_jax.errors import ConfigError, DataError
from tests.helpers import REPO

HEADER = "user_id,ts,clicked,item_id,category,price,age_group,gender,city,hour,device"
ROWS = ["a,10,1,i1,c1,1.0,20,F,x,9,ios",
        "a,20,0,i2,c2,3.0,20,F,x,10,ios",
        "b,15,1,i2,c2,3.0,30,M,y,11,web",
        "a,30,1,i3,c1,5.0,20,F,x,12,ios",
        "b,40,1,i4,c3,7.0,30,M,y,13,web",
        "a,50,0,i1,c1,1.0,20,F,x,14,ios"]


def write_csv(path, rows=ROWS, header=HEADER):
  path.write_text("\n".join([header, *rows]) + "\n")
  return str(path)


def config_for(**tabular_overrides):
  config = tabular_config.get_config()
  config.data.max_seq_len = 2
  config.data.max_bad_row_ratio = 0.0
  t = config.data.tabular
  t.valid_fraction, t.test_fraction = 0.2, 0.2
  for key, value in tabular_overrides.items():
    t[key] = value
  return config


def test_hand_worked_csv_with_behaviours_from_clicks(tmp_path):
  config = config_for(path=write_csv(tmp_path / "log.csv"))
  schema, splits, stats, _ = tabular.generate(config.data)
  # ts sorted 10,15,20,30,40,50: t_valid = 4th = 30, t_test = 5th = 40.
  assert schema.num_examples == (("train", 3), ("valid", 1), ("test", 2))
  assert (stats["num_users"], stats["num_items"], stats["num_categories"]) == (2, 4, 3)
  tr, va, te = splits["train"], splits["valid"], splits["test"]
  # Train (chronological): a@10 i1, b@15 i2, a@20 i2; items i1, i2 -> 2, 3; i3, i4 -> OOV 1.
  np.testing.assert_array_equal(tr["item.item_id"], [2, 3, 3])
  np.testing.assert_array_equal(tr["label"], [1, 1, 0])
  # Behaviours = earlier clicks only: a@20 sees i1; a@30 sees i1 (a@20 was not clicked).
  np.testing.assert_array_equal(tr["hist.item_id"], [[0, 0], [0, 0], [2, 0]])
  np.testing.assert_array_equal(va["item.item_id"], [1])
  np.testing.assert_array_equal(va["hist.item_id"], [[2, 0]])
  # Test: b@40 sees i2; a@50 sees i1, i3 (i3 first seen in valid -> OOV), newest first.
  np.testing.assert_array_equal(te["item.item_id"], [1, 2])
  np.testing.assert_array_equal(te["hist.item_id"], [[3, 0], [1, 2]])
  np.testing.assert_array_equal(te["hist.category"], [[3, 0], [2, 2]])
  np.testing.assert_array_equal(te["hist_len"], [1, 2])
  # Numeric price standardised with the training mean 7/3 and std sqrt(8/9).
  np.testing.assert_allclose(tr["item.price"], (np.array([1, 3, 3]) - 7 / 3) / np.sqrt(8 / 9),
                             rtol=1e-6)
  np.testing.assert_array_equal(tr["user.city"], [2, 3, 2])
  np.testing.assert_array_equal(tr["group_id"], [0, 1, 0])


def test_all_rows_as_behaviours(tmp_path):
  config = config_for(path=write_csv(tmp_path / "log.csv"), behavior_rows="all")
  _, splits, _, _ = tabular.generate(config.data)
  # a@30 (valid) now sees i1@10 and i2@20 (stored newest first).
  np.testing.assert_array_equal(splits["valid"]["hist.item_id"], [[3, 2]])


def test_parquet_list_columns_and_pre_split_files(tmp_path):
  def write(name, users, ts, items, hists):
    table = pa.table({"user_id": users, "ts": ts, "clicked": [1] * len(users), "item_id": items,
                      "category": ["x"] * len(users), "device": ["ios"] * len(users),
                      "hist_items": pa.array(hists, pa.list_(pa.string()))})
    pq.write_table(table, tmp_path / name)
    return str(tmp_path / name)

  config = config_for(
      train_path=write("train.parquet", ["u1", "u2"], [1, 2], ["a", "b"], [["c", "b", "a"], []]),
      valid_path=write("valid.parquet", ["u1"], [3], ["d"], [["a", "d"]]),
      test_path=write("test.parquet", ["u2"], [4], ["c"], [None]),
      item_fields="item_id,category", user_fields="", context_fields="device",
      behavior_fields="item_id", behavior_source="list", behavior_columns="item_id:hist_items")
  schema, splits, _, _ = tabular.generate(config.data)
  assert schema.num_examples == (("train", 2), ("valid", 1), ("test", 1))
  # Vocabulary: training candidates and training behaviours a, b, c -> 2, 3, 4; d -> OOV.
  # Lists are given oldest first and stored newest first (the last T = 2 of them).
  np.testing.assert_array_equal(splits["train"]["hist.item_id"], [[2, 3], [0, 0]])
  np.testing.assert_array_equal(splits["valid"]["hist.item_id"], [[1, 2]])
  np.testing.assert_array_equal(splits["valid"]["item.item_id"], [1])
  np.testing.assert_array_equal(splits["test"]["hist_len"], [0])


def test_csv_list_columns(tmp_path):
  path = write_csv(tmp_path / "log.csv", header="user_id,ts,clicked,item_id,category,hist",
                   rows=["a,1,1,i1,c,", "a,2,0,i2,c,i1", "b,3,1,i1,c,i2|i1|i2"])
  config = config_for(path=path, valid_fraction=0.0, test_fraction=0.0,
                      item_fields="item_id,category", user_fields="", context_fields="",
                      behavior_fields="item_id", behavior_source="list",
                      behavior_columns="item_id:hist")
  _, splits, _, _ = tabular.generate(config.data)
  np.testing.assert_array_equal(splits["train"]["hist.item_id"], [[0, 0], [2, 0], [3, 2]])


def test_bad_rows_are_counted_and_limited(tmp_path):
  rows = ROWS + ["a,60,maybe,i1,c1,1.0,20,F,x,9,ios",  # bad label
                 ",61,1,i1,c1,1.0,20,F,x,9,ios",  # missing user
                 "a,62,1,i1,c1,cheap,20,F,x,9,ios",  # non-numeric price
                 "a,63,1,i1,c1,1.0,20,F,x,9,ios,extra"]  # too many fields
  path = write_csv(tmp_path / "log.csv", rows)
  _, splits, stats, _ = tabular.generate(_with_ratio(config_for(path=path), 0.5).data)
  bad = stats["bad_rows"]["log.csv"]
  assert (bad["rows"], bad["bad"]) == (10, 4)
  assert sum(len(s["label"]) for s in splits.values()) == 6
  with pytest.raises(DataError, match=r"log.csv: 4 of 10 rows are malformed"):
    tabular.generate(_with_ratio(config_for(path=path), 0.1).data)


def _with_ratio(config, ratio):
  config.data.max_bad_row_ratio = ratio
  return config


def test_configuration_and_file_errors(tmp_path):
  path = write_csv(tmp_path / "log.csv")
  with pytest.raises(DataError, match=r"'town' \(user_fields\) named"):
    tabular.generate(config_for(path=path, user_fields="town").data)
  with pytest.raises(DataError, match="set path"):
    tabular.generate(config_for().data)
  with pytest.raises(DataError, match="file not found"):
    tabular.generate(config_for(path=str(tmp_path / "nope.csv")).data)
  (tmp_path / "empty.csv").write_text(HEADER + "\n")
  with pytest.raises(DataError, match="empty"):
    tabular.generate(config_for(path=str(tmp_path / "empty.csv")).data)
  with pytest.raises(DataError, match="must be a categorical item field"):
    tabular.generate(config_for(path=path, behavior_fields="price").data)


def test_ensure_prepared_end_to_end(tmp_path):
  config = config_for(path=write_csv(tmp_path / "log.csv"))
  config.data.prepared_dir = str(tmp_path / "prepared")
  directory, schema = data_lib.ensure_prepared(config.data)
  cols = schema_lib.load_split(directory, "test", schema)
  assert cols["hist.item_id"].shape == (2, 2)
  with open(os.path.join(directory, "stats.json")) as f:
    assert json.load(f)["checksum"] == schema_lib.dataset_checksum(directory)


# ------------------------------------------------------------------- bad input


def test_ids_stay_strings_and_a_byte_order_mark_is_dropped(tmp_path):
  # "00194" and "194" are two users, "007" and "7" two items (sorted as a, b and i1, i2 were).
  users, items = {"a": "00194", "b": "194"}, {"i1": "007", "i2": "7"}
  rows = []
  for row in ROWS:
    fields = row.split(",")
    fields[0], fields[3] = users[fields[0]], items.get(fields[3], fields[3])
    rows.append(",".join(fields))
  path = tmp_path / "bom.csv"
  path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8-sig")
  _, splits, stats, _ = tabular.generate(config_for(path=str(path)).data)
  assert (stats["num_users"], stats["num_items"]) == (2, 4)
  _, expected, _, _ = tabular.generate(config_for(path=write_csv(tmp_path / "log.csv")).data)
  for split in splits:
    for name, column in expected[split].items():
      np.testing.assert_array_equal(splits[split][name], column, err_msg=f"{split} {name}")


@pytest.mark.parametrize("value,line", [("1e200", 3), ("1e308", 5), ("1e40", 7)])
def test_numeric_values_too_large_to_standardise_are_one_clear_error(tmp_path, value, line):
  # Line 3 and 5 are training rows (the variance overflows), line 7 a test row (float32 does).
  rows = list(ROWS)
  fields = rows[line - 2].split(",")
  fields[5] = value
  rows[line - 2] = ",".join(fields)
  with pytest.raises(DataError) as e:
    tabular.generate(config_for(path=write_csv(tmp_path / "log.csv", rows)).data)
  message = str(e.value)
  assert f"numeric field 'item.price': value {float(value):g} (log.csv line {line}) is too large" \
      in message
  assert "rescale the column" in message and "non-finite" not in message and "\n" not in message


def test_a_few_dates_among_unix_seconds_are_the_bad_rows(tmp_path):
  rows = [f"u{k % 4},{1_400_000_000 + 3600 * k},{k % 2},i{k % 5},c{k % 3},1.0,20,F,x,9,ios"
          for k in range(40)]
  for k in (9, 19, 29):  # file lines 11, 21, 31
    rows[k] = rows[k].replace(f",{1_400_000_000 + 3600 * k},", f",2014-05-{k // 10 + 1:02d},")
  path = write_csv(tmp_path / "log.csv", rows)
  with pytest.raises(DataError, match=r"log.csv: 3 of 40 rows are malformed .*first: line 11 "
                     r"\(timestamp 'ts' is not a number like most rows\) '2014-05-01'"):
    tabular.generate(config_for(path=path).data)
  _, _, stats, _ = tabular.generate(_with_ratio(config_for(path=path), 0.1).data)
  assert stats["num_rows"] == 37 and stats["bad_rows"]["log.csv"]["bad"] == 3


def test_ragged_lines_name_their_file_line(tmp_path):
  ragged = "a,63,1,i1,c1,1.0,20,F,x,9,ios,extra"
  path = write_csv(tmp_path / "plain.csv", ROWS[:2] + [ragged] + ROWS[2:])
  with pytest.raises(DataError, match=r"first: line 4 \(wrong number of fields\) 'a,63,1"):
    tabular.generate(config_for(path=path).data)
  # A blank line and a quoted value spanning two lines come before it: still its file line.
  rows = [ROWS[0], "", ROWS[1], 'b,15,1,i2,c2,3.0,30,M,"y\nz",11,web', ragged, *ROWS[3:]]
  path = write_csv(tmp_path / "tricky.csv", rows)
  with pytest.raises(DataError, match=r"first: line 7 \(wrong number of fields\) 'a,63,1"):
    tabular.generate(config_for(path=path).data)
  # Other bad rows are named by their file line too, with the bad value.
  rows[4] = "a,70,maybe,i1,c1,1.0,20,F,x,9,ios"
  path = write_csv(tmp_path / "label.csv", rows)
  with pytest.raises(DataError, match=r"first: line 7 \(label 'clicked' is not 0/1\) 'maybe'"):
    tabular.generate(config_for(path=path).data)


# ------------------------------------------------------------------- hashed fields


def test_hash_declarations_parse_and_malformed_ones_are_one_line_config_errors(tmp_path):
  fields, buckets = records.parse_fields(" brand:hash(100000), price:numeric,shop,tag:hash( 7 )",
                                         "data.tabular.item_fields")
  assert fields == (("brand", "categorical"), ("price", "numeric"), ("shop", "categorical"),
                    ("tag", "categorical"))
  assert buckets == {"brand": 100000, "tag": 7}
  for kind in ("hash(0)", "hash(-5)", "hash()", "hash", "hash(abc)", "hash(1e6)",
               f"hash({vocab.MAX_HASH_BUCKETS + 1})"):
    with pytest.raises(ConfigError) as e:
      records.parse_fields(f"item_id,brand:{kind}", "data.tabular.item_fields")
    message = str(e.value)
    assert message.startswith(f"data.tabular.item_fields: field 'brand' has kind {kind!r}")
    assert "\n" not in message
  with pytest.raises(ConfigError, match=r"field 'brand' has kind 'hash\(0\)'; a hashed field is "
                     r"hash\(N\) with N, the number of buckets, an integer from 1 to \d+ "
                     r"\(e.g. brand:hash\(100000\)\)"):
    records.parse_fields("brand:hash(0)", "data.tabular.item_fields")
  with pytest.raises(ConfigError, match="kind 'hsh'; expected 'categorical', 'numeric' or "
                     r"'hash\(N\)'"):
    records.parse_fields("brand:hsh", "data.tabular.item_fields")
  # Through a config, before any file is read.
  path = write_csv(tmp_path / "log.csv")
  with pytest.raises(ConfigError, match=r"data.tabular.user_fields: field 'city' has kind "
                     r"'hash\(0\)'"):
    tabular.generate(config_for(path=path, user_fields="city:hash(0)").data)


HASHED = "item_id:hash(1000),category:hash(50),price:numeric"


def _hash_id(value, buckets):
  return schema_lib.NUM_RESERVED_IDS + encoding.stable_hash(value) % buckets


def test_hashed_fields_give_values_unseen_in_training_their_own_ids(tmp_path):
  rows = list(ROWS)
  rows[5] = "a,50,0,i1,,1.0,20,F,x,14,ios"  # a@50 has no category
  config = config_for(path=write_csv(tmp_path / "log.csv", rows), item_fields=HASHED,
                      user_fields="age_group,gender,city:hash(10)")
  schema, splits, stats, _ = tabular.generate(config.data)
  f = schema.features
  assert [(x.name, x.vocab_size) for x in f.item_fields] == [
      ("item_id", 1002), ("category", 52), ("price", 0)]
  assert [(x.name, x.vocab_size) for x in f.user_fields] == [
      ("age_group", 4), ("gender", 4), ("city", 12)]
  assert "item.item_id hashed into 1000 buckets" in stats["protocol"]
  ids = {v: _hash_id(v, 1000) for v in ("i1", "i2", "i3", "i4")}
  cats = {v: _hash_id(v, 50) for v in ("c1", "c2", "c3")}
  assert len(set(ids.values())) == 4 and all(2 <= i < 1002 for i in ids.values())
  tr, va, te = splits["train"], splits["valid"], splits["test"]
  # As in the hand-worked example, but i3 (first seen in valid) and i4 (test) are not OOV.
  np.testing.assert_array_equal(tr["item.item_id"], [ids["i1"], ids["i2"], ids["i2"]])
  np.testing.assert_array_equal(va["item.item_id"], [ids["i3"]])
  np.testing.assert_array_equal(te["item.item_id"], [ids["i4"], ids["i1"]])
  np.testing.assert_array_equal(tr["hist.item_id"], [[0, 0], [0, 0], [ids["i1"], 0]])
  np.testing.assert_array_equal(te["hist.item_id"], [[ids["i2"], 0], [ids["i3"], ids["i1"]]])
  np.testing.assert_array_equal(te["hist.category"], [[cats["c2"], 0], [cats["c1"], cats["c1"]]])
  # A missing hashed value is the OOV id; a field without hash(N) still has its vocabulary.
  np.testing.assert_array_equal(te["item.category"], [cats["c3"], schema_lib.OOV_ID])
  np.testing.assert_array_equal(te["user.city"], [_hash_id("y", 10), _hash_id("x", 10)])
  np.testing.assert_array_equal(tr["user.gender"], [2, 3, 2])


def test_hashed_list_behaviours(tmp_path):
  path = write_csv(tmp_path / "log.csv", header="user_id,ts,clicked,item_id,category,hist",
                   rows=["a,1,1,i1,c,", "a,2,0,i2,c,i1", "b,3,1,i1,c,i2|i9|i1"])
  config = config_for(path=path, valid_fraction=0.0, test_fraction=0.0,
                      item_fields="item_id:hash(100),category", user_fields="",
                      context_fields="", behavior_fields="item_id", behavior_source="list",
                      behavior_columns="item_id:hist")
  _, splits, _, _ = tabular.generate(config.data)
  h = {v: _hash_id(v, 100) for v in ("i1", "i2", "i9")}
  np.testing.assert_array_equal(splits["train"]["hist.item_id"],
                                [[0, 0], [h["i1"], 0], [h["i1"], h["i9"]]])


# ------------------------------------------------------------------- the cache keyed by content


def _prepare_cli(path, tmp_path, *args):
  """`python -m mian_jax.prepare` on the CSV at `path`; its stdout."""
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"))
  result = subprocess.run(
      [sys.executable, "-m", "mian_jax.prepare", "--config=configs/tabular.py",
       f"--config.data.tabular.path={path}", "--config.data.max_seq_len=2",
       "--config.data.max_bad_row_ratio=0", "--config.data.tabular.valid_fraction=0.2",
       "--config.data.tabular.test_fraction=0.2", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def _printed(stdout, label):
  return [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith(label)]


@pytest.mark.slow
def test_a_csv_edited_in_place_is_prepared_anew(tmp_path, monkeypatch):
  """Issue 23, 2: all labels set to 1 in place (same size, same mtime) reused the old data."""
  path = write_csv(tmp_path / "log.csv")
  first = _prepare_cli(path, tmp_path)
  stat, sha_1 = os.stat(path), fileio.sha256_file(path)
  write_csv(tmp_path / "log.csv", rows=[r.replace(",0,", ",1,") for r in ROWS])
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.path.getsize(path) == stat.st_size  # only the bytes tell the files apart
  second, sha_2 = _prepare_cli(path, tmp_path), fileio.sha256_file(path)
  (dir_1,), (dir_2,) = _printed(first, "prepared directory"), _printed(second, "prepared directory")
  assert dir_1 != dir_2 and os.path.isdir(dir_1)
  assert _printed(first, "checksum") != _printed(second, "checksum")
  with open(os.path.join(dir_2, "stats.json")) as f:
    assert json.load(f)["positive_rate"]["train"] == 1.0
  # Each directory records the bytes it came from, and so does the output.
  assert sha_1 != sha_2
  for directory, stdout, sha in ((dir_1, first, sha_1), (dir_2, second, sha_2)):
    manifest = data_lib.read_raw_manifest(directory)
    assert manifest["files"] == [{"path": path, "bytes": stat.st_size, "sha256": sha}]
    assert directory.endswith(data_lib.raw_key(manifest))
    assert _printed(stdout, "raw file") == [f"{path} ({stat.st_size} bytes, sha256 {sha})"]
  # The original bytes again: the first directory is found, not prepared a third time.
  write_csv(tmp_path / "log.csv")
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path / "cache"))
  config = config_for(path=path, valid_fraction=0.2, test_fraction=0.2)
  assert data_lib.ensure_prepared(config.data)[0] == dir_1


def test_a_named_prepared_dir_from_other_bytes_is_refused(tmp_path, caplog):
  path = write_csv(tmp_path / "log.csv")
  config = config_for(path=path)
  config.data.prepared_dir = str(tmp_path / "prepared")
  with caplog.at_level("INFO"):
    data_lib.ensure_prepared(config.data)
  assert f"comes from {path} (" in caplog.text and "sha256" in caplog.text
  write_csv(tmp_path / "log.csv", rows=ROWS[:-1])
  with pytest.raises(DataError, match=r"prepared_dir=.* was prepared from other raw files \("):
    data_lib.ensure_prepared(config.data)


def test_the_cached_copy_serves_when_the_raw_file_is_gone(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path / "cache"))
  path = write_csv(tmp_path / "log.csv")
  config = config_for(path=path)
  directory, _ = data_lib.ensure_prepared(config.data)
  os.remove(path)
  with caplog.at_level("WARNING"):
    assert data_lib.ensure_prepared(config.data)[0] == directory
  assert "file not found" in caplog.text and directory in caplog.text
  # Two copies from different bytes: which one is meant is not guessed.
  write_csv(tmp_path / "log.csv", rows=ROWS[:-1])
  data_lib.ensure_prepared(config.data)
  os.remove(path)
  with pytest.raises(DataError, match="2 prepared copies of these settings"):
    data_lib.ensure_prepared(config.data)


def test_a_deleted_vocabulary_directory_is_named_as_missing(tmp_path):
  """Not "prepared before vocabularies were saved": the recorded checksum covered vocab/."""
  from tests import test_vocab
  (tmp_path / "log.csv").write_text(test_vocab.CSV)
  config = tabular_config.get_config().data
  config.max_seq_len = 2
  config.tabular.update(path=str(tmp_path / "log.csv"), valid_fraction=0.2, test_fraction=0.2)
  directory = str(tmp_path / "prepared")
  tabular.prepare(config, directory)
  vocab.load_vocabularies(directory)
  os.remove(os.path.join(directory, "vocab", "encoders.json"))
  with pytest.raises(DataError, match=r"vocab/encoders.json is missing: the vocabularies of "):
    vocab.load_encoders(directory)
  for name in os.listdir(os.path.join(directory, "vocab")):
    os.remove(os.path.join(directory, "vocab", name))
  os.rmdir(os.path.join(directory, "vocab"))
  with pytest.raises(DataError, match=r"prepared/vocab is missing: it was deleted after "
                     "preparation; prepare .* again"):
    vocab.load_vocabularies(directory)
