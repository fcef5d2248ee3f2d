"""Parameter names and shapes stay as they were, so that a checkpoint written before a refactor
restores after it: each model's tree (path -> shape, no weights), built with the tiny test
config, equals the one recorded in tests/fixtures/param_tree_<model>.json.

A change of the tree that is meant (it breaks old checkpoints: say so in the change) is recorded
anew with `python -m tests.test_param_trees --rewrite` (review the diff).
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from mian_jax import models
from mian_jax.data import synthetic
from mian_jax.data.pipeline import gather_batch
from tests.helpers import tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def fixture_path(name: str) -> str:
  return os.path.join(FIXTURES, f"param_tree_{name}.json")


def param_tree(name: str) -> dict[str, list[int]]:
  """"a/b/c" -> shape of every parameter of model `name` under tiny_config, without computing
  any weight."""
  config = tiny_config(**{"model.name": name})
  schema, splits = synthetic.generate(config.data.synthetic, config.data.max_seq_len)
  batch = gather_batch(splits["valid"], schema, np.arange(4))
  model = models.create_model(config.model, schema.features)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, train=False))
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  return {path: list(leaf.shape) for path, leaf in sorted(flat.items())}


def test_every_model_has_a_recorded_tree():
  recorded = {f.removeprefix("param_tree_").removesuffix(".json") for f in os.listdir(FIXTURES)
              if f.startswith("param_tree_")}
  assert recorded == set(models.MODELS)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_parameter_tree_is_unchanged(name):
  with open(fixture_path(name)) as f:
    recorded = json.load(f)
  tree = param_tree(name)
  reshaped = sorted(k for k in tree.keys() & recorded.keys() if tree[k] != recorded[k])
  assert tree == recorded, (f"{name}: added {sorted(tree.keys() - recorded.keys())}, removed "
                            f"{sorted(recorded.keys() - tree.keys())}, reshaped {reshaped}")


if __name__ == "__main__":  # python -m tests.test_param_trees --rewrite
  if sys.argv[1:] != ["--rewrite"]:
    sys.exit("usage: python -m tests.test_param_trees --rewrite  (records every model's tree anew)")
  os.makedirs(FIXTURES, exist_ok=True)
  for model_name in sorted(models.MODELS):
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in param_tree(model_name).items()]
    with open(fixture_path(model_name), "w") as f:
      f.write("{\n" + ",\n".join(lines) + "\n}\n")  # one parameter a line
    print(f"wrote {fixture_path(model_name)}")
