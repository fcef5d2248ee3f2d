"""The training loop: learning, exact resume, device equivalence, NaN and damaged checkpoints."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mian_jax import checkpointing, sharding, steps, train
from mian_jax.data import schema as schema_lib
from mian_jax.errors import NonFiniteLossError
from tests.helpers import final_params, tiny_config, train_on_devices


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_short_run_learns_the_planted_signal(tmp_path, optimizer):
  config = tiny_config(**{"data.synthetic.num_train": 12000, "train.batch_size": 64,
                          "train.num_train_steps": -1, "train.num_epochs": 1.0,
                          "train.log_every_steps": 50, "train.eval_every_steps": 1000,
                          "checkpoint.every_steps": 1000, "train.learning_rate": 3e-3,
                          "train.optimizer": optimizer})
  results = train.train_and_evaluate(config, str(tmp_path))
  test = results["test"]
  assert test["oracle_auc"] > 0.7
  assert test["auc"] > 0.62, test  # chance is 0.5
  with open(tmp_path / "eval" / "test_metrics.json") as f:
    written = json.load(f)
  assert written["auc"] == pytest.approx(test["auc"]) and written["step"] == 187
  assert {"auc", "logloss", "gauc", "step", "num_examples", "oracle_auc"} <= set(written)
  lines = (tmp_path / "metrics" / "metrics.jsonl").read_text().splitlines()
  assert any("train/loss" in line for line in lines)
  assert [p for p in os.listdir(tmp_path / "metrics") if p.startswith("events.out.tfevents")]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_interrupted_and_resumed_run_ends_with_identical_parameters(tmp_path, optimizer):
  config = lambda num_steps: tiny_config(**{"train.optimizer": optimizer,  # noqa: E731
                                            "train.num_train_steps": num_steps})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(config(10), straight)
  train.train_and_evaluate(config(6), resumed)
  first, meta = final_params(config(10), resumed)
  assert meta["step"] == 6
  train.train_and_evaluate(config(10), resumed)
  a, meta_a = final_params(config(10), straight)
  b, meta_b = final_params(config(10), resumed)
  assert meta_a["step"] == meta_b["step"] == 10
  jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(AssertionError):
    jax.tree.map(np.testing.assert_array_equal, first, b)


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_one_and_two_devices_give_the_same_result(optimizer):
  assert jax.device_count() == 2, "conftest asks for two simulated devices"
  final = []
  for devices in (jax.devices()[:1], jax.devices()):
    state = train_on_devices(tiny_config(**{"train.optimizer": optimizer}), devices, num_steps=4)
    assert state.params["logit"]["kernel"].sharding.mesh.size == len(devices)
    final.append(jax.device_get(state.params))
  # The attention key bias shifts every logit of a query equally, so softmax makes its gradient
  # exactly zero; in float32 it is rounding noise of either sign, which Adam scales up to +-lr.
  # It is the one parameter whose value depends on the reduction order, so it is left out.
  for path, a in jax.tree_util.tree_leaves_with_path(final[0]):
    if "key" in jax.tree_util.keystr(path) and path[-1].key == "bias":
      continue
    b = final[1]
    for key in path:
      b = b[key.key]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_train_step_is_traced_once(tmp_path, monkeypatch):
  traces = []
  original = steps.train_step

  def counting(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(steps, "train_step", counting)
  train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert len(traces) == 1


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(**{"train.num_train_steps": 4}), workdir)
  monkeypatch.setattr(steps, "l2_penalty", lambda *a: jnp.float32(jnp.nan))
  with pytest.raises(NonFiniteLossError, match="last good checkpoint is step 4"):
    train.train_and_evaluate(tiny_config(**{"train.num_train_steps": 12}), workdir)
  manager = checkpointing.create_manager(workdir, tiny_config().checkpoint, read_only=True)
  assert manager.all_steps() == [4]
  manager.close()


def _flip_bytes_of_largest_file(state_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(state_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    f.write(b"\xff" * 20)


def _empty(state_dir):
  shutil.rmtree(state_dir)
  os.makedirs(state_dir)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_flip_bytes_of_largest_file, _empty])
def test_damaged_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage):
  """Issue 11, problem 10: bit-rot restored NaN parameters; metrics were NaN and gAUC negative."""
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(), workdir)  # checkpoints at 4 and 8
  damage(os.path.join(workdir, "checkpoints", "8", "state"))
  results = train.train_and_evaluate(tiny_config(), workdir)  # resumes from 4, redoes 5-8
  assert results["test"]["last_step"] == 8 and np.isfinite(results["test"]["auc"])
  assert any("damaged" in r.getMessage() for r in caplog.records)
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  params, meta = final_params(tiny_config(), workdir)
  assert meta["step"] == 8


def test_a_packed_batch_unpacks_exactly_and_trains_like_the_nested_one():
  run = steps.setup(tiny_config())
  mesh, state = run.mesh, run.state
  host = run.train_batches().batch(0)
  packed = sharding.pack_to_global(host, mesh)
  assert isinstance(packed, sharding.PackedBatch) and packed.packed.ndim == 2
  unpacked = jax.device_get(jax.jit(lambda p: p.unpack())(packed))

  def assert_same(a, b):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)

  jax.tree.map(assert_same, host, unpacked)
  assert unpacked["label"].dtype == np.float32 and unpacked["hist"]["item_id"].dtype == np.int32
  rng = jax.random.PRNGKey(1)
  _, nested_metrics = run.train_step(jax.tree.map(jnp.copy, state), sharding.to_global(host, mesh),
                                     rng)
  _, packed_metrics = run.train_step(state, packed, rng)
  assert float(nested_metrics["loss"]) == float(packed_metrics["loss"])


def test_each_split_is_checked_once_per_run_however_often_it_is_validated(tmp_path, monkeypatch):
  checked, validate = [], schema_lib.validate_columns
  monkeypatch.setattr(schema_lib, "validate_columns",
                      lambda schema, split, *args, **kwargs: (
                          checked.append(split), validate(schema, split, *args, **kwargs))[1])
  config = tiny_config(**{"train.num_train_steps": 12, "train.eval_every_steps": 4,
                          "eval.periodic_valid_examples": 0})
  steps.setup(config)  # prepares the data (its writes are checked block by block)
  checked.clear()
  train.train_and_evaluate(config, str(tmp_path))
  valid_lines = (tmp_path / "metrics" / "metrics.jsonl").read_text().count('"valid/auc"')
  assert valid_lines >= 3
  assert sorted(checked) == ["test", "train", "valid"]  # not once per validation
