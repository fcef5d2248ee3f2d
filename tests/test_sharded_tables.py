"""Embedding tables row-sharded over the "model" axis of a data x model mesh (config.sharding):
on 4 fake CPU devices (a child process), a 2 x 2 run's losses and parameters equal a 4 x 1
replicated run's, with dense and lazy Adam; each device holds half of a sharded table and of
its moments; the compiled step's collectives are the expected ones. A 2 x 2 checkpoint restores
in this process on one device and on another mesh, and trains on."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mian_jax import checkpointing, evaluate, recorded_config, sharding, steps, train
from mian_jax import data as data_lib
from mian_jax.errors import ConfigError
from tests.helpers import REPO, tiny_config

pytestmark = pytest.mark.slow  # real runs, several processes or devices: `pytest -m slow`

# 200 items: item_id has 202 ids -> 204 rows, more than the 112 ids a batch of 16 looks up in
# it (so lazy Adam's row tables, [112, 4], are smaller than the table); category 7 -> 8 rows.
ROWS, MULTIPLE, ITEMS = "item_id,category", 4, 200
TABLE = ("embedding", "item_embedding", "embed_item_id", "embedding")


def sharded_config(model, **overrides):
  return tiny_config(**{"model.name": "din", "data.synthetic.num_items": ITEMS,
                        "sharding.model": model,
                        "sharding.row_shard_fields": ROWS, "sharding.row_multiple": MULTIPLE,
                        **overrides})


def _collectives(hlo: str) -> list[str]:
  """The collective instructions of a compiled module's text, one line each."""
  return [line.strip() for line in hlo.splitlines()
          if re.search(r"= .* (all-gather|all-reduce|all-to-all|reduce-scatter|"
                       r"collective-permute)(-start)?\(", line)]


def child(workdir: str) -> dict:
  """Runs in a process with 4 CPU devices: the measurements the tests below check."""
  assert jax.device_count() == 4
  out = {}
  for optimizer in ("adam", "lazy_adam"):
    runs = {}
    for model in (1, 2):
      run = steps.setup(sharded_config(model, **{"train.optimizer": optimizer}))
      batches, state = run.train_batches(), run.state
      first = sharding.to_global(batches.batch(0), run.mesh)
      compiled = run.train_step.lower(state, first, jax.random.PRNGKey(1)).compile()
      losses = []
      for step in range(3):
        state, metrics = compiled(state, sharding.to_global(batches.batch(step), run.mesh),
                                  jax.random.PRNGKey(1))
        losses.append(float(metrics["loss"]))
      params = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
      runs[model] = {"losses": losses, "mesh": dict(run.mesh.shape), "hlo": compiled.as_text(),
                     "params": {jax.tree_util.keystr(k): np.asarray(v) for k, v in params}}
      if model == 2:
        table = state.params
        for key in TABLE:
          table = table[key]
        moment = next(x for x in jax.tree_util.tree_leaves(state.opt_state)
                      if x.shape == table.shape)  # Adam's first moment of the table
        out[f"{optimizer}_shards"] = {
            "table": list(table.shape),
            "table_shards": [list(s.data.shape) for s in table.addressable_shards],
            "table_spec": str(table.sharding.spec),
            "moment_shards": [list(s.data.shape) for s in moment.addressable_shards],
            "dense_spec": str(state.params["logit"]["kernel"].sharding.spec)}
    out[optimizer] = {
        "losses": {m: r["losses"] for m, r in runs.items()},
        "meshes": {m: r["mesh"] for m, r in runs.items()},
        "max_param_diff": max(float(np.max(np.abs(v - runs[2]["params"][k])))
                              for k, v in runs[1]["params"].items()),
        "collectives": _collectives(runs[2]["hlo"])}
  config = sharded_config(2, **{"train.num_train_steps": 4})
  train.train_and_evaluate(config, workdir)
  return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("sharded")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                 os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {flags}",
             MIAN_JAX_CACHE=str(tmp_path_factory.getbasetemp() / "cache"))  # conftest's
  done = subprocess.run([sys.executable, "-m", "tests.test_sharded_tables", str(tmp / "run")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stderr[-4000:]
  line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return tmp, json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_a_2x2_run_equals_the_replicated_4x1_run(measured, optimizer):
  _, out = measured
  r = out[optimizer]
  assert r["meshes"] == {"1": {"data": 4, "model": 1}, "2": {"data": 2, "model": 2}}
  np.testing.assert_allclose(r["losses"]["2"], r["losses"]["1"], rtol=0, atol=1e-6)
  assert r["max_param_diff"] < 1e-4  # Adam turns float noise in tiny gradients into ~lr steps


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_each_device_holds_half_of_a_sharded_table_and_of_its_moments(measured, optimizer):
  _, out = measured
  s = out[f"{optimizer}_shards"]
  assert s["table"] == [204, 4] and s["table_spec"] == "P('model', None)"
  assert s["table_shards"] == s["moment_shards"] == [[102, 4]] * 4
  assert s["dense_spec"] == "P()"


def test_the_sharded_steps_collectives(measured):
  """Dense Adam: the looked-up vectors are summed over "model" (a masked local gather, then an
  all-reduce of [rows of the batch, D]); the gradient of a table shard [102, 4] is summed over
  "data"; no table is ever gathered whole. Lazy Adam: only ids and looked-up rows travel (row
  tables of the batch's 112 ids), nothing the size of the table or of its shard."""
  _, out = measured
  dense, lazy = out["adam"]["collectives"], out["lazy_adam"]["collectives"]
  assert not [c for c in dense if "all-gather" in c]
  for collectives in (dense, lazy):
    assert not [c for c in collectives if "f32[204,4]" in c]  # a whole table
  assert [c for c in dense if "all-reduce" in c and "f32[102,4]" in c]  # its shard's gradient
  assert [c for c in dense if "all-reduce" in c and "f32[8,4]" in c]  # looked-up vectors
  assert not [c for c in lazy if "f32[102,4]" in c]
  assert [c for c in lazy if "all-reduce" in c and "f32[112,4]" in c]  # looked-up rows


def test_a_2x2_checkpoint_restores_on_one_device_and_trains_on_another_mesh(measured, tmp_path):
  tmp, _ = measured
  workdir = str(tmp / "run")
  config = recorded_config.get_config(workdir)
  assert config.sharding.model == 2
  # One device (this process has two): evaluation reads the sharded checkpoint.
  one = config.copy_and_resolve_references()
  one.sharding.model = 1
  run = steps.setup(one, sharding.create_mesh(jax.devices()[:1]))
  manager = checkpointing.create_manager(workdir, one.checkpoint, read_only=True)
  state, _ = checkpointing.restore(manager, run.state, step=4)
  metrics = evaluate.evaluate_split(run, state, "test", 4, None)
  with open(os.path.join(workdir, "eval", "test_metrics.json")) as f:
    assert metrics["auc"] == pytest.approx(json.load(f)["auc"], abs=1e-6)
  # Two devices on a 1 x 2 mesh (model = 2 again, other data size): training continues.
  config.train.num_train_steps = 6
  results = train.train_and_evaluate(config, workdir)
  assert results["test"]["step"] == 6


def test_sharding_config_errors_are_one_line():
  with pytest.raises(ConfigError, match=r"sharding.model=3 must be a positive divisor of the 2"):
    sharding.create_mesh(model=3)
  features = data_lib.ensure_prepared(tiny_config().data)[1].features
  c = tiny_config().sharding
  c.row_shard_fields = "item_id,nope"
  with pytest.raises(ConfigError, match=r"row_shard_fields names \['nope'\]"):
    sharding.row_sharded_fields(features, c)
  c.row_shard_fields, c.row_shard_min_rows = "", 9
  assert sharding.row_sharded_fields(features, c) == {
      f.name for g in (features.item_fields, features.user_fields, features.context_fields)
      for f in g if f.is_categorical and f.vocab_size >= 9}
  padded = sharding.pad_rows(features, frozenset({"item_id"}), 64)
  assert padded.item_field("item_id").vocab_size == 64
  assert padded.item_field("category").vocab_size == features.item_field("category").vocab_size
  with pytest.raises(ConfigError, match="sharding.model=2 must divide sharding.row_multiple=3"):
    steps.setup(sharded_config(2, **{"sharding.row_multiple": 3, "sharding.model": 2}),
                sharding.create_mesh(model=2))


if __name__ == "__main__":
  print("RESULT " + json.dumps(child(sys.argv[1])), flush=True)
