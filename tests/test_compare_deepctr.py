"""benchmarks/compare_deepctr.py without torch: column specs, L2 matching, table, flags.

The DeepCTR-Torch side runs in its own venv (benchmarks/deepctr_peer.py); nothing here imports
torch or trains a model.
"""

import os
import sys

import numpy as np
import pytest

from benchmarks import compare_deepctr
from mian_jax import workdir
from mian_jax.data import schema as schema_lib
from tests.helpers import REPO


def tiny_schema(numeric_user_field: bool = False) -> schema_lib.Schema:
  user = [{"name": "user_id", "kind": "categorical", "vocab_size": 12}]
  if numeric_user_field:
    user.append({"name": "age", "kind": "numeric"})
  return schema_lib.schema_from_json({
      "format_version": schema_lib.FORMAT_VERSION, "max_seq_len": 5,
      "item_fields": [{"name": "item_id", "kind": "categorical", "vocab_size": 50},
                      {"name": "category", "kind": "categorical", "vocab_size": 7}],
      "behavior_fields": ["item_id", "category"],
      "user_fields": user,
      "context_fields": [{"name": "hour", "kind": "categorical", "vocab_size": 26}],
      "num_examples": {"train": 4, "valid": 2, "test": 2},
  })


def test_module_does_not_import_torch():
  assert "torch" not in sys.modules
  assert "deepctr_torch" not in sys.modules


def test_feature_column_spec_names_vocabularies_and_sharing():
  spec = compare_deepctr.feature_column_spec(tiny_schema(numeric_user_field=True), "mean")
  cols = {c["name"]: c for c in spec["columns"]}
  assert list(cols) == ["item_id", "category", "hist_item_id", "hist_category", "user_user_id",
                        "user_age", "context_hour"]
  assert spec["history_feature_list"] == ["item_id", "category"]
  assert spec["length_column"] == "hist_len"
  assert cols["item_id"] == {"kind": "sparse", "name": "item_id", "column": "item.item_id",
                             "vocab_size": 50, "embedding_name": "item_id"}
  hist = cols["hist_item_id"]
  assert hist["kind"] == "varlen" and hist["column"] == "hist.item_id"
  assert hist["embedding_name"] == "item_id"  # shares the candidate's table
  assert (hist["vocab_size"], hist["maxlen"], hist["length_name"], hist["combiner"]) == (
      50, 5, "hist_len", "mean")
  assert cols["hist_category"]["vocab_size"] == 7
  assert cols["user_user_id"]["vocab_size"] == 12
  assert cols["user_user_id"]["column"] == "user.user_id"
  assert cols["user_age"] == {"kind": "dense", "name": "user_age", "column": "user.age"}
  assert cols["context_hour"]["column"] == "context.hour"


def test_l2_matching():
  schema = tiny_schema()
  assert compare_deepctr.table_rows(schema) == 50 + 7 + 12 + 26
  lookups = compare_deepctr.lookups_per_example(schema, np.array([0, 2, 4, 2]))
  assert lookups == pytest.approx(4 + 2.0 * 2)  # 4 single fields + mean length 2 x 2 fields
  l2 = compare_deepctr.peer_l2("matched", 1e-3, "batch_embeddings", 128, lookups, 95)
  assert l2["l2_reg_embedding"] == pytest.approx(1e-3 * 128 * 8 / 95)
  assert l2["l2_reg_linear"] == l2["l2_reg_embedding"] and l2["l2_reg_dnn"] == 0
  assert compare_deepctr.peer_l2("matched", 1e-3, "all_weights", 128, 8, 95) == {
      "l2_reg_embedding": 0.128, "l2_reg_linear": 0.128, "l2_reg_dnn": 0.128}
  assert compare_deepctr.peer_l2("matched", 1e-3, "none", 128, 8, 95)["l2_reg_embedding"] == 0
  assert compare_deepctr.peer_l2("literal", 1e-3, "batch_embeddings", 128, 8, 95)[
      "l2_reg_embedding"] == 1e-3
  assert compare_deepctr.peer_l2("1e-6", 1e-3, "batch_embeddings", 128, 8, 95)[
      "l2_reg_embedding"] == 1e-6
  with pytest.raises(ValueError, match="peer_l2"):
    compare_deepctr.peer_l2("lots", 1e-3, "batch_embeddings", 128, 8, 95)


def test_format_table_mean_std_and_difference():
  records = [
      {"model": "din", "impl": "mian_jax", "seed": 0, "test_auc": 0.70, "test_logloss": 0.50,
       "train_seconds": 10.0},
      {"model": "din", "impl": "mian_jax", "seed": 1, "test_auc": 0.72, "test_logloss": 0.52,
       "train_seconds": 12.0},
      {"model": "din", "impl": "deepctr_torch", "seed": 0, "test_auc": 0.69, "test_logloss": 0.51,
       "train_seconds": 20.0},
  ]
  lines = compare_deepctr.format_table(records).splitlines()
  assert lines[0].split()[:3] == ["model", "impl", "seeds"]
  ours = next(x for x in lines if "mian_jax" in x)
  assert "0.7100 ± 0.0141" in ours and "0.5100 ± 0.0141" in ours and " 2 " in ours
  theirs = next(x for x in lines if "deepctr_torch" in x)
  assert "0.6900 ± 0.0000" in theirs
  diff = next(x for x in lines if "ours - theirs" in x)
  assert "+0.0200" in diff


def test_mean_std():
  assert compare_deepctr.mean_std([1.0]) == (1.0, 0.0)
  mean, std = compare_deepctr.mean_std([1.0, 3.0])
  assert (mean, std) == (2.0, pytest.approx(np.sqrt(2.0)))


def test_config_overrides_are_config_flags():
  args = compare_deepctr.parse_args(
      ["--config=configs/synthetic.py", "--models=din", "--config.train.num_epochs=2",
       "--config.model.mlp_dims=(64, 16)"])
  assert args.models == "din"
  assert args.overrides == ["--config.train.num_epochs=2", "--config.model.mlp_dims=(64, 16)"]
  with pytest.raises(SystemExit):
    compare_deepctr.parse_args(["--config=configs/synthetic.py", "--set", "train.num_epochs=2"])
  config = workdir.load_config(
      os.path.join(REPO, "configs", "synthetic.py"),
      ["--config.data.synthetic.num_train=4000", "--config.train.num_epochs=2",
       "--config.model.mlp_dims=(64, 16)", "--config.model.use_dice=True",
       "--config.train.l2_scope=none"])
  assert config.data.synthetic.num_train == 4000
  assert config.train.num_epochs == 2.0 and isinstance(config.train.num_epochs, float)
  assert tuple(config.model.mlp_dims) == (64, 16)
  assert config.model.use_dice is True and config.train.l2_scope == "none"
  with pytest.raises(ValueError, match="unknown config key"):
    workdir.load_config(os.path.join(REPO, "configs", "synthetic.py"),
                       ["--config.train.no_such_key=1"])


def test_a_bad_override_is_a_one_line_error():
  with pytest.raises(SystemExit) as e:
    compare_deepctr.main(["--config=configs/synthetic.py", "--impls=mian_jax",
                          "--config.train.l2_scope=everything"])
  message = str(e.value)
  assert message.startswith("error: ") and "l2_scope" in message and "\n" not in message


def test_missing_peer_python_is_a_one_line_error():
  with pytest.raises(SystemExit) as e:
    compare_deepctr.main(["--config=configs/synthetic.py", "--peer_python=/no/such/python"])
  message = str(e.value)
  assert message.startswith("error: --peer_python=/no/such/python not found")
  assert "\n" not in message


def test_the_peer_trains_on_our_batches():
  """DeepCTR-Torch sees the rows our TrainBatches gives each step, across an epoch boundary."""
  from benchmarks import deepctr_peer  # noqa: PLC0415 - numpy only at import
  from mian_jax.data import pipeline  # noqa: PLC0415
  n, batch_size, seed = 103, 16, 5
  schema = type("Sizes", (), {"size": staticmethod(lambda split: n)})()
  ours = pipeline.TrainBatches({}, schema, batch_size, seed=seed)
  order = deepctr_peer.BatchOrder(n, batch_size, seed)
  for step in range(3 * (n // batch_size) + 2):
    np.testing.assert_array_equal(order.rows(step), ours.rows(step))
    np.testing.assert_array_equal(deepctr_peer.batch_rows(n, batch_size, seed, step),
                                  ours.rows(step))
