"""Prepared-data format, synthetic source and batching."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mian_jax import data as data_lib
from mian_jax.data import pipeline, synthetic
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError
from tests.helpers import tiny_config


def _prepare(tmp_path, **overrides):
  config = tiny_config(**overrides)
  config.data.prepared_dir = str(tmp_path / "prepared")
  return data_lib.ensure_prepared(config.data)


def test_synthetic_is_deterministic_and_valid():
  c = tiny_config().data
  schema_a, splits_a = synthetic.generate(c.synthetic, c.max_seq_len)
  schema_b, splits_b = synthetic.generate(c.synthetic, c.max_seq_len)
  assert schema_a == schema_b
  for split in schema_lib.SPLITS:
    schema_lib.validate_columns(schema_a, split, splits_a[split])
    for name in splits_a[split]:
      np.testing.assert_array_equal(splits_a[split][name], splits_b[split][name])
  c.synthetic.seed = 1
  _, splits_c = synthetic.generate(c.synthetic, c.max_seq_len)
  assert not np.array_equal(splits_a["train"]["label"], splits_c["train"]["label"])


def test_synthetic_plants_short_histories_and_a_learnable_oracle():
  c = tiny_config().data
  c.synthetic.num_train = 20000
  _, splits = synthetic.generate(c.synthetic, c.max_seq_len)
  train = splits["train"]
  assert (train["hist_len"] == 0).any() and (train["hist_len"] == c.max_seq_len).any()
  from mian_jax import metrics
  assert metrics.auc(train["label"], train["extra.click_prob"]) > 0.7


def test_write_and_load_roundtrip(tmp_path):
  directory, schema = _prepare(tmp_path)
  assert os.path.isfile(os.path.join(directory, "stats.json"))
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
  cols = schema_lib.load_split(directory, "train", schema)
  assert isinstance(cols["label"], np.memmap)
  assert cols["hist.item_id"].shape == (1024, 6)
  assert schema_lib.read_schema(directory) == schema


def test_out_of_vocabulary_ids_are_rejected(tmp_path):
  directory, schema = _prepare(tmp_path)
  path = os.path.join(directory, "valid", "item.category.npy")
  values = np.load(path)
  values[3] = schema.features.item_field("category").vocab_size  # one past the end
  np.save(path, values)
  with pytest.raises(DataError, match="out of vocabulary"):
    schema_lib.load_split(directory, "valid", schema)


def test_padding_must_match_lengths(tmp_path):
  directory, schema = _prepare(tmp_path)
  path = os.path.join(directory, "test", "hist_len.npy")
  lengths = np.load(path)
  lengths[lengths < 6][:1] += 1
  lengths[np.flatnonzero(lengths < 6)[0]] += 1
  np.save(path, lengths)
  with pytest.raises(DataError, match="padding id 0"):
    schema_lib.load_split(directory, "test", schema)


def test_missing_directory_and_schema_mismatch(tmp_path):
  config = tiny_config()
  config.data.source = "prepared"
  config.data.prepared_dir = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match="no prepared data"):
    data_lib.ensure_prepared(config.data)
  directory, _ = _prepare(tmp_path)
  config.data.prepared_dir = directory
  config.data.max_seq_len = 7
  with pytest.raises(DataError, match="max_seq_len"):
    data_lib.ensure_prepared(config.data)


def test_malformed_schema_is_one_clear_error(tmp_path):
  directory, _ = _prepare(tmp_path)
  path = os.path.join(directory, "schema.json")
  with open(path) as f:
    content = json.load(f)
  content["behavior_fields"] = ["season"]
  with open(path, "w") as f:
    json.dump(content, f)
  with pytest.raises(DataError, match="behaviour field 'season'"):
    schema_lib.read_schema(directory)


def test_cache_key_depends_on_settings_not_location():
  a, b = tiny_config().data, tiny_config().data
  assert data_lib.settings_key(a) == data_lib.settings_key(b)
  b.prepared_dir = "/elsewhere"
  assert data_lib.settings_key(a) == data_lib.settings_key(b)
  b.synthetic.seed = 5
  assert data_lib.settings_key(a) != data_lib.settings_key(b)


def test_train_batches_are_a_function_of_step_and_split_by_process(tmp_path):
  directory, schema = _prepare(tmp_path)
  cols = schema_lib.load_split(directory, "train", schema)
  whole = pipeline.TrainBatches(cols, schema, 16, seed=3)
  again = pipeline.TrainBatches(cols, schema, 16, seed=3)
  np.testing.assert_array_equal(whole.rows(70), again.rows(70))  # resumable mid-epoch 2
  epoch = np.concatenate([whole.rows(s) for s in range(whole.steps_per_epoch)])
  assert len(np.unique(epoch)) == len(epoch) == 1024  # each example once per epoch
  halves = [pipeline.TrainBatches(cols, schema, 16, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  for step in (0, 5, 64):
    parts = [h.rows(step) for h in halves]
    assert len(parts[0]) == len(parts[1]) == 8
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), whole.rows(step))
  with pytest.raises(ConfigError, match="divisible"):
    pipeline.TrainBatches(cols, schema, 15, seed=3, process_index=0, process_count=2)


def test_eval_batches_cover_each_example_once_with_padding(tmp_path):
  directory, schema = _prepare(tmp_path)
  cols = schema_lib.load_split(directory, "valid", schema)
  seen = []
  for batch, rows in pipeline.eval_batches(cols, schema, "valid", 100):
    assert batch["label"].shape == (100,)
    np.testing.assert_array_equal(batch["weight"], rows >= 0)
    seen.append(rows[rows >= 0])
  np.testing.assert_array_equal(np.concatenate(seen), np.arange(256))


def test_prefetch_reraises_errors():
  def broken():
    yield 1
    raise RuntimeError("boom")
  it = pipeline.prefetch_iterator(broken(), 2)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


def test_behaviours_are_stored_newest_first():
  hist = np.array([[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0], [2, 3, 4, 9]], np.int32)
  lengths = np.array([3, 1, 0, 4])
  np.testing.assert_array_equal(schema_lib.newest_first(hist, lengths),
                                [[7, 6, 5, 0], [8, 0, 0, 0], [0, 0, 0, 0], [9, 4, 3, 2]])
  assert "newest first" in schema_lib.__doc__


def test_a_prepared_directory_of_an_older_format_says_how_to_prepare_again(tmp_path):
  directory, _ = _prepare(tmp_path)
  path = os.path.join(directory, "schema.json")
  with open(path) as f:
    content = json.load(f)
  content["format_version"] = 1
  with open(path, "w") as f:
    json.dump(content, f)
  with pytest.raises(DataError,
                     match="format_version 1 .*newest first.*mian_jax.prepare") as e:
    schema_lib.read_schema(directory)
  assert "\n" not in str(e.value)


def test_the_cache_key_changes_with_the_format_version(monkeypatch):
  config = tiny_config().data
  before = data_lib.settings_key(config)
  monkeypatch.setattr(schema_lib, "FORMAT_VERSION", schema_lib.FORMAT_VERSION + 1)
  assert data_lib.settings_key(config) != before


# ------------------------------------------------------------------- damaged data, bad settings


def test_an_empty_column_file_is_a_clear_error(tmp_path):
  directory, schema = _prepare(tmp_path)
  path = os.path.join(directory, "train", "label.npy")
  open(path, "wb").close()
  with pytest.raises(DataError) as e:
    schema_lib.load_split(directory, "train", schema)
  assert str(e.value) == (f"{path}: an empty file, so the prepared data in {directory} is "
                          "damaged; delete the directory and prepare it again")


def test_a_cache_entry_without_schema_json_is_prepared_again(tmp_path, monkeypatch):
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path / "cache"))
  config = tiny_config().data
  directory, schema = data_lib.ensure_prepared(config)
  checksum = schema_lib.dataset_checksum(directory)
  os.remove(os.path.join(directory, "schema.json"))
  assert data_lib.ensure_prepared(config) == (directory, schema)
  assert schema_lib.dataset_checksum(directory) == checksum
  assert os.listdir(tmp_path / "cache" / "prepared") == [os.path.basename(directory)]
  # A directory the user named is never deleted: it must be empty or prepared.
  config.prepared_dir = str(tmp_path / "mine")
  os.makedirs(tmp_path / "mine" / "train")
  with pytest.raises(DataError, match=r"mine holds files but no schema.json.*delete it"):
    data_lib.ensure_prepared(config)
  os.rmdir(tmp_path / "mine" / "train")
  assert data_lib.ensure_prepared(config)[1] == schema


def test_a_dead_preparations_temporary_directory_is_removed(tmp_path):
  source, schema = _prepare(tmp_path)
  target = str(tmp_path / "target")
  # A preparation killed while writing leaves its temporary directory behind.
  killed = ("import os, sys, numpy as np\n"
            "from mian_jax.data import schema as s\n"
            "splits = {x: s.load_split(sys.argv[1], x) for x in s.SPLITS}\n"
            "np.lib.format.write_array_header_1_0 = lambda *a, **k: os._exit(9)\n"
            "s.write_prepared(sys.argv[2], s.read_schema(sys.argv[1]), splits)\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert subprocess.run([sys.executable, "-c", killed, source, target], cwd=repo,
                        timeout=60).returncode == 9
  left = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-target-")]
  assert len(left) == 1
  (tmp_path / left[0].replace("-target-", "-other-", 1)).mkdir()  # the same dead owner
  # Beside it: one of a live preparation (this process), an old-style one (no owner in the
  # name) idle for two hours and a fresh old-style one, which might be live.
  live = tmp_path / (schema_lib._tmp_prefix(target) + "live0000")
  old, fresh = tmp_path / ".tmp-target-abcd1234", tmp_path / ".tmp-target-efgh5678"
  two_hours_ago = time.time() - 7200
  for d in (live, old, fresh):
    (d / "train").mkdir(parents=True)
    if d != fresh:
      for path in (d / "train", d):
        os.utime(path, (two_hours_ago, two_hours_ago))
  splits = {s: schema_lib.load_split(source, s, schema) for s in schema_lib.SPLITS}
  copy_vocab = lambda tmp: shutil.copytree(os.path.join(source, "vocab"),  # noqa: E731
                                           os.path.join(tmp, "vocab"))
  schema_lib.write_prepared(target, schema, splits, write_vocabularies=copy_vocab)
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".tmp-")) == sorted(
      [live.name, fresh.name])
  assert schema_lib.dataset_checksum(target) == schema_lib.dataset_checksum(source)


def test_synthetic_history_lengths_above_max_seq_len_are_a_config_error(tmp_path):
  with pytest.raises(ConfigError) as e:
    _prepare(tmp_path, **{"data.max_seq_len": 1})
  assert str(e.value) == (
      "data.synthetic: min_seq_len=2 must lie in [0, data.max_seq_len=1] (history lengths are "
      "drawn up to max_seq_len); lower them, e.g. --config.data.synthetic.min_seq_len=1 "
      "--config.data.synthetic.short_seq_len=1, or raise data.max_seq_len")
  directory, schema = _prepare(tmp_path, **{"data.max_seq_len": 1,
                                            "data.synthetic.min_seq_len": 1})
  assert schema.features.max_seq_len == 1
  assert schema_lib.load_split(directory, "train", schema)["hist.item_id"].shape == (1024, 1)
