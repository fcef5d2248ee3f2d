"""The benchmark scripts' data builders (no timing here: speed targets live in the scripts)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import throughput  # noqa: E402


def test_throughput_data_has_amazon_vocabularies_and_valid_columns():
  schema, columns = throughput.make_data("electronics")  # validates the columns itself
  f = schema.features
  assert f.item_field("item_id").vocab_size == 63_001 + 2
  assert f.item_field("category").vocab_size == 801 + 2
  assert columns["hist.item_id"].shape == (throughput.NUM_EXAMPLES, 30)
  assert columns["user.user_id"].max() < 192_403 + 2
  assert np.isin(columns["label"], (0, 1)).all()
