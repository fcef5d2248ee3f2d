"""launch/diagnose_split.py, as a library and as `python -m launch.diagnose_split`, on a tiny
hand-built prepared data set (numbers worked out by hand)."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch import diagnose_split as diagnose
from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError
from tests.helpers import REPO

SEQ = 6
# (user, item, label, hist_len); item 1 is the OOV id, item 5 is never a train candidate.
TRAIN = [(10, 2, 1, 0), (10, 3, 0, 1), (11, 2, 1, 0), (11, 3, 0, 1), (12, 2, 1, 0),
         (12, 4, 0, 1)]
TEST = [(10, 2, 1, 6),  # warm user, warm item
        (10, 3, 0, 5),  # warm, warm
        (11, 5, 1, 2),  # warm user, cold item (unseen)
        (11, 1, 0, 0),  # warm user, cold item (OOV)
        (13, 2, 0, 0),  # cold user, warm item
        (13, 4, 1, 1),  # cold user, warm item
        (14, 3, 0, 6),  # cold user, warm item
        (14, 1, 1, 3)]  # cold user, cold item
VALID = [(10, 4, 1, 2), (15, 2, 0, 0)]


def _columns(rows):
  user, item, label, hist_len = (np.asarray(x) for x in zip(*rows))
  hist = np.where(np.arange(SEQ)[None, :] < hist_len[:, None], 2, 0).astype(np.int32)
  return {"item.item_id": item.astype(np.int32), "hist.item_id": hist,
          "hist_len": hist_len.astype(np.int32), "label": label.astype(np.float32),
          "group_id": user.astype(np.int64)}


@pytest.fixture
def prepared(tmp_path):
  features = schema_lib.FeatureSpec(
      item_fields=(schema_lib.Field("item_id", "categorical", 6),), behavior_fields=("item_id",),
      user_fields=(), context_fields=(), max_seq_len=SEQ)
  splits = {"train": _columns(TRAIN), "valid": _columns(VALID), "test": _columns(TEST)}
  schema = schema_lib.Schema(features=features, source="hand-built",
                             num_examples=tuple((s, len(c["label"])) for s, c in splits.items()))
  directory = str(tmp_path / "prepared")
  schema_lib.write_prepared(directory, schema, splits)
  return directory, schema


def _write_predictions(path, scores, labels):
  pq.write_table(pa.table({"score": np.asarray(scores, np.float32),
                           "label": np.asarray(labels, np.float32)}), path)


def test_cold_shares_and_train_only_baselines(prepared):
  report = diagnose.diagnose(*prepared)
  test = report["splits"]["test"]
  assert (test["examples"], test["users"], test["items"]) == (8, 4, 5)
  assert test["positive_rate"] == 0.5
  assert test["cold_user_share"] == 4 / 8  # users 13 and 14
  assert test["cold_item_share"] == 3 / 8  # item 5 and the OOV id twice
  assert test["empty_history_share"] == 2 / 8
  assert test["short_history_share"] == 5 / 8  # hist_len 2, 0, 0, 1, 3
  auc = {name: v["auc"] for name, v in test["baselines"].items()}
  # Item CTR: item 2 (3/3) > unseen = train rate 0.5 > item 4 (0/1) > item 3 (0/2).
  # Positives score (2, unseen, 4, unseen), negatives (3, unseen, 2, 3): 10.5 of 16 pairs.
  assert auc["item CTR"] == pytest.approx(10.5 / 16)
  # Popularity: positives (3, 0, 1, 0) against negatives (2, 0, 3, 2): 5.5 of 16 pairs.
  assert auc["item popularity"] == pytest.approx(5.5 / 16)
  # Every train user clicked one of two: all users, seen or not, score the train rate.
  assert auc["user CTR"] == 0.5
  assert auc["bias-only (item + user logit)"] == pytest.approx(10.5 / 16)
  assert report["splits"]["valid"]["cold_user_share"] == 0.5


def test_smoothed_ctr_shrinks_toward_the_train_rate():
  keys, labels = np.array([7, 7, 8]), np.array([1.0, 1.0, 0.0])
  ctr = diagnose.smoothed_ctr(keys, labels, np.array([7, 8, 9]), smoothing=3.0)
  np.testing.assert_allclose(ctr, [(2 + 2) / 5, (0 + 2) / 4, 2 / 3])


def test_predictions_by_subset_and_written_outputs(prepared, tmp_path):
  labels = [row[2] for row in TEST]
  path = str(tmp_path / "perfect.parquet")
  _write_predictions(path, labels, labels)
  report = diagnose.diagnose(*prepared, predictions=[("perfect", path)])
  subsets = report["predictions"]["subsets"]
  assert {k: v["examples"] for k, v in subsets.items()} == {
      "all": 8, "warm user & warm item": 2, "cold user": 4, "cold item": 3,
      "empty history": 2, "history 1-4": 3, "history 5-14": 3, "history >= 15": 0}
  assert diagnose.ORACLE not in subsets["all"]["auc"]  # this data knows no click probability
  # Empty histories are two non-clicks, histories 1-4 three clicks ((11, 5, 2), (13, 4, 1),
  # (14, 1, 3)): one class, no AUC; every other non-empty subset is perfect.
  assert subsets["empty history"]["positive_rate"] == 0.0
  assert subsets["history 1-4"]["positive_rate"] == 1.0
  one_class = ("empty history", "history 1-4", "history >= 15")
  assert all(np.isnan(subsets[k]["auc"]["perfect"]) for k in one_class)
  assert all(v["auc"]["perfect"] == 1.0 for k, v in subsets.items() if k not in one_class)
  assert subsets["all"]["auc"]["bias-only (item + user logit)"] == pytest.approx(10.5 / 16)
  # Cold users' clicks are items 4 and OOV, their non-clicks items 2 and 3: 2 of 4 pairs.
  assert subsets["cold user"]["auc"]["item CTR"] == pytest.approx(2 / 4)
  # Per user: 13 ranks its click (item 4) below item 2 (AUC 0), 14 its OOV click above item 3.
  assert subsets["cold user"]["gauc"]["item CTR"] == pytest.approx(0.5)
  # The warm/warm pair: item 2 (click) above item 3 (no click).
  assert subsets["warm user & warm item"]["auc"]["bias-only (item + user logit)"] == 1.0
  text = diagnose.to_markdown(report)
  assert "| cold-user share | 0.5000 | 0.5000 |" in text
  assert "| warm user & warm item | 2 | 0.5000 | 1.0000 | 1.0000 | 1.0000 |" in text


def test_predictions_file_errors(prepared, tmp_path):
  short = str(tmp_path / "short.parquet")
  _write_predictions(short, np.zeros(7), np.zeros(7))
  with pytest.raises(DataError, match="has 7 rows but the test split has 8 examples"):
    diagnose.diagnose(*prepared, predictions=[("short", short)])
  with pytest.raises(DataError, match="predictions file not found"):
    diagnose.diagnose(*prepared, predictions=[("x", str(tmp_path / "none.parquet"))])
  shuffled = str(tmp_path / "shuffled.parquet")
  _write_predictions(shuffled, np.zeros(8), [1 - row[2] for row in TEST])
  with pytest.raises(DataError, match="labels differ"):
    diagnose.diagnose(*prepared, predictions=[("s", shuffled)])


def test_command_line_writes_outputs_and_reports_errors_in_one_line(prepared, tmp_path):
  directory, _ = prepared
  labels = [row[2] for row in TEST]
  path = str(tmp_path / "p.parquet")
  _write_predictions(path, labels, labels)
  base = [sys.executable, "-m", "launch.diagnose_split", "--config=configs/synthetic.py",
          "--config.data.source=prepared", f"--config.data.prepared_dir={directory}",
          f"--config.data.max_seq_len={SEQ}"]
  ok = subprocess.run([*base, f"--predictions=model={path}", f"--out={tmp_path / 'out'}"],
                      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "| cold item | 3 | 0.6667 |" in ok.stdout
  with open(tmp_path / "out" / "diagnostics.json") as f:
    saved = json.load(f)
  assert saved["predictions"]["subsets"]["cold user"]["auc"]["model"] == 1.0
  assert (tmp_path / "out" / "diagnostics.md").read_text() == ok.stdout
  assert not [p for p in os.listdir(tmp_path / "out") if ".tmp-" in p]
  bad = subprocess.run([*base, f"--predictions={tmp_path / 'missing.parquet'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("error: predictions file not found")


def test_the_oracle_is_scored_beside_the_models_where_the_data_knows_it(tmp_path):
  features = schema_lib.FeatureSpec(
      item_fields=(schema_lib.Field("item_id", "categorical", 6),), behavior_fields=("item_id",),
      user_fields=(), context_fields=(), max_seq_len=SEQ)
  splits = {"train": _columns(TRAIN), "valid": _columns(VALID), "test": _columns(TEST)}
  for columns in splits.values():  # the oracle ranks by a probability that inverts item order
    columns["extra.click_prob"] = (1.0 / (1 + columns["item.item_id"])).astype(np.float32)
  schema = schema_lib.Schema(features=features, source="hand-built", extra_columns=("click_prob",),
                             num_examples=tuple((s, len(c["label"])) for s, c in splits.items()))
  directory = str(tmp_path / "prepared")
  schema_lib.write_prepared(directory, schema, splits)
  labels = [row[2] for row in TEST]
  path = str(tmp_path / "perfect.parquet")
  _write_predictions(path, labels, labels)
  subsets = diagnose.diagnose(directory, schema, predictions=[("m", path)])[
      "predictions"]["subsets"]
  # Clicks on items 2, 5, 4, 1 (p = 1/3, 1/6, 1/5, 1/2), non-clicks on 3, 1, 2, 3 (1/4, 1/2,
  # 1/3, 1/4): 1/3 wins 2 pairs and ties 1, 1/2 wins 3 and ties 1, the others win none.
  assert subsets["all"]["auc"][diagnose.ORACLE] == pytest.approx(6 / 16)
  assert subsets["all"]["auc"]["m"] == 1.0
  with pytest.raises(DataError, match="must be distinct"):
    diagnose.diagnose(directory, schema, predictions=[(diagnose.ORACLE, path)])
