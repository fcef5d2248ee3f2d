"""Checkpoint integrity (no non-finite saves, checksums, damaged steps) and the workdir lock."""

import logging
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training.train_state import TrainState
from ml_collections import ConfigDict

from mian_jax import checkpointing
from mian_jax import workdir as workdir_lib
from mian_jax.errors import DataError, NonFiniteLossError, NonFiniteStateError, WorkdirBusyError
from tests.helpers import REPO


def _state(value: float, step: int = 0) -> TrainState:
  """A 64x64 dense layer with Adam, weights `value` plus fixed noise (so the data files do not
  compress to nothing), one Adam update in (so the moments are not all zero)."""
  noise = jax.random.normal(jax.random.PRNGKey(0), (64 * 65,))
  params = {"dense": {"kernel": value + noise[:4096].reshape(64, 64), "bias": value + noise[4096:]}}
  state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
  state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
  return state.replace(step=step)


def _manager(workdir, max_to_keep=3, read_only=False):
  return checkpointing.create_manager(workdir, ConfigDict({"max_to_keep": max_to_keep}),
                                      read_only=read_only)


def _save_steps(workdir, steps, max_to_keep=3):
  manager = _manager(workdir, max_to_keep)
  for step in steps:
    checkpointing.save(manager, _state(float(step), step), {"step": step})
  checkpointing.finalize(manager)
  manager.close()


def _step_dir(workdir, step):
  return os.path.join(checkpointing.checkpoint_dir(workdir), str(step))


def _flip_bytes_of_largest_data_file(step_dir, count=20):
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
           if os.path.basename(root) == "d"]  # the array data, not orbax's metadata
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    data = bytearray(f.read())
    start = len(data) // 2
    for i in range(start, start + count):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_save_refuses_a_non_finite_state_and_writes_nothing(tmp_path, where):
  workdir = str(tmp_path)
  manager = _manager(workdir)
  checkpointing.save(manager, _state(1.0, 1), {"step": 1})
  bad = _state(2.0, 2)
  if where == "params":
    bad = bad.replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.nan), bad.params))
  else:  # an infinite Adam moment, finite parameters
    bad = bad.replace(opt_state=jax.tree.map(
        lambda x: x.at[0].set(jnp.inf) if x.ndim else x, bad.opt_state))
  with pytest.raises(NonFiniteStateError) as raised:
    checkpointing.save(manager, bad, {"step": 2})
  message = str(raised.value)
  assert "\n" not in message and isinstance(raised.value, NonFiniteLossError)
  assert "step 2:" in message and "NOT saved" in message
  assert "the last good checkpoint there is step 1" in message
  checkpointing.finalize(manager)
  assert manager.all_steps() == [1]
  manager.close()
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == ["1"]


def test_save_names_no_good_checkpoint_when_there_is_none(tmp_path):
  manager = _manager(str(tmp_path))
  bad = _state(jnp.nan, 1)
  with pytest.raises(NonFiniteStateError, match="NOT saved .* no checkpoint was written"):
    checkpointing.save(manager, bad, {"step": 1})
  manager.close()
  assert os.listdir(checkpointing.checkpoint_dir(str(tmp_path))) == []


def test_each_landed_save_gets_a_checksum_file_that_matches(tmp_path):
  workdir = str(tmp_path)
  manager = _manager(workdir)
  checkpointing.save(manager, _state(1.0, 1), {"step": 1})
  checkpointing.save(manager, _state(2.0, 2), {"step": 2})
  # Step 1 was hashed when step 2 was saved; step 2 when the saves are finalized.
  assert os.path.exists(os.path.join(_step_dir(workdir, 1), checkpointing.CHECKSUM_FILE))
  checkpointing.finalize(manager)
  manager.close()
  for step in (1, 2):
    assert checkpointing.verify_checksums(_step_dir(workdir, step)) is True


def test_a_bit_flipped_checkpoint_is_damaged_skipped_and_moved_aside(tmp_path, caplog):
  workdir = str(tmp_path)
  _save_steps(workdir, [1, 2])
  _flip_bytes_of_largest_data_file(_step_dir(workdir, 2))
  manager = _manager(workdir)

  with pytest.raises(DataError) as raised:  # an explicit step: one line, nothing moved
    checkpointing.restore(manager, _state(0.0), step=2)
  message = str(raised.value)
  assert "\n" not in message and message.startswith("checkpoint 2 in ")
  assert "unreadable or damaged" in message and "differs from sha256sums.json" in message
  assert os.path.isdir(_step_dir(workdir, 2))

  with caplog.at_level(logging.WARNING):
    state, meta = checkpointing.restore(manager, _state(0.0), workdir=workdir)
  assert meta["step"] == 1 and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, state.params, _state(1.0).params)
  assert any("step 2 is damaged" in r.getMessage() and "sha256" in r.getMessage()
             for r in caplog.records)
  damaged = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  assert len(damaged) == 1 and damaged[0].startswith("2-")
  assert manager.all_steps() == [1]
  checkpointing.save(manager, _state(2.0, 2), {"step": 2})  # the step can be saved again
  checkpointing.finalize(manager)
  assert manager.all_steps() == [1, 2]
  manager.close()


def test_a_checkpoint_without_checksum_file_still_restores(tmp_path, caplog):
  workdir = str(tmp_path)
  _save_steps(workdir, [1])
  # As if the process was killed between the save landing and the hashing.
  os.remove(os.path.join(_step_dir(workdir, 1), checkpointing.CHECKSUM_FILE))
  manager = _manager(workdir, read_only=True)
  with caplog.at_level(logging.INFO):
    state, meta = checkpointing.restore(manager, _state(0.0), workdir=workdir)
  manager.close()
  assert meta["step"] == 1
  jax.tree.map(np.testing.assert_array_equal, state.params, _state(1.0).params)
  assert any("unverified" in r.getMessage() for r in caplog.records)


def test_a_restored_non_finite_state_is_damaged(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [1])
  manager = _manager(workdir)
  bad = _state(jnp.nan, 2)  # written by orbax directly, past `save`'s check, no checksum
  manager.save(2, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": bad.params, "opt_state": bad.opt_state,
                                   "step": bad.step}),
      meta=ocp.args.JsonSave({"step": 2})))
  manager.wait_until_finished()
  with pytest.raises(DataError, match="checkpoint 2 .* NaN or infinite"):
    checkpointing.restore(manager, _state(0.0), step=2)
  _, meta = checkpointing.restore(manager, _state(0.0), workdir=workdir)
  assert meta["step"] == 1
  manager.close()


def _wide_state(rows: int, step: int = 0) -> TrainState:
  """A model with one embedding table of `rows` rows (path ends `embed_item_id/embedding`)."""
  table = jax.random.normal(jax.random.PRNGKey(rows), (rows, 4))
  params = {"embedding": {"embed_item_id": {"embedding": table}}}
  return TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3)).replace(step=step)


def _tree(workdir):
  """{relative path: (size, mtime_ns)} of every file under `workdir`."""
  return {os.path.relpath(os.path.join(root, n), workdir):
          (os.stat(os.path.join(root, n)).st_size, os.stat(os.path.join(root, n)).st_mtime_ns)
          for root, _, names in os.walk(workdir) for n in names}


def test_another_runs_checkpoint_is_a_one_line_error_and_nothing_moves(tmp_path):
  """Issue 23, 1: a vocabulary that grew (402 -> 1002 rows) failed orbax's restore, was taken
  for damage, and the good checkpoints went to checkpoints_damaged/."""
  workdir = str(tmp_path)
  manager = _manager(workdir)
  for step in (1, 2):
    checkpointing.save(manager, _wide_state(402, step),
                       {"step": step, "data_checksum": "a" * 64, "schema_fingerprint": "f1"})
  checkpointing.finalize(manager)
  before = _tree(workdir)
  for step in (None, 2):  # resume order, and an explicit step
    with pytest.raises(checkpointing.OtherRunError) as raised:
      checkpointing.restore(manager, _wide_state(1002), step=step, workdir=workdir)
    message = str(raised.value)
    assert "\n" not in message and "nothing was moved" in message
    assert "table item_id has 1002 rows for this data, 402 in the checkpoint" in message
  assert _tree(workdir) == before and manager.all_steps() == [1, 2]
  # Same shapes, other data: the meta's checksum stops it before any array is read, so even a
  # step whose arrays are unreadable (no checksum file to tell) is not taken for damage.
  os.remove(os.path.join(_step_dir(workdir, 2), checkpointing.CHECKSUM_FILE))
  for root, _, names in os.walk(_step_dir(workdir, 2)):
    for name in names:
      if os.path.basename(root) == "d":  # orbax's array data
        os.truncate(os.path.join(root, name), 10)
  before = _tree(workdir)
  with pytest.raises(checkpointing.OtherRunError,
                     match=r"trained on other data \(data checksum bbbbbbbbbbbb for this data, "
                           r"aaaaaaaaaaaa in the checkpoint\)"):
    checkpointing.restore(manager, _wide_state(402), workdir=workdir,
                          identity={"data_checksum": "b" * 64, "schema_fingerprint": "f1"})
  assert _tree(workdir) == before
  # The same data: that step is damaged after all, set aside, and step 1 restores.
  _, meta = checkpointing.restore(manager, _wide_state(402), workdir=workdir,
                                  identity={"data_checksum": "a" * 64})
  assert meta["step"] == 1 and manager.all_steps() == [1]
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))[0].startswith("2-")
  manager.close()


def test_other_run_differences_name_parameters_first_then_the_data():
  here = {"params/a/embed_item_id/embedding": (10, 4), "params/b/kernel": (3, 2),
          "opt_state/0/mu/a/embed_item_id/embedding": (10, 4), "step": ()}
  saved = {"params/a/embed_item_id/embedding": (8, 4), "params/c/kernel": (3, 2),
           "opt_state/0/mu/a/embed_item_id/embedding": (8, 4), "step": ()}
  assert checkpointing.other_run_differences(
      {"data_checksum": "x" * 64}, {"data_checksum": "y" * 64, "schema_fingerprint": "f"},
      here, saved) == [
          "table item_id has 10 rows for this data, 8 in the checkpoint",
          "the checkpoint has no params/b/kernel",
          "the checkpoint has params/c/kernel, this model has not",
          "data checksum yyyyyyyyyyyy for this data, xxxxxxxxxxxx in the checkpoint"]
  assert checkpointing.other_run_differences({}, {"data_checksum": None}, here, here) == []


def test_rotation_leaves_no_orphan_checksum_files(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, [1, 2, 3, 4, 5], max_to_keep=2)
  directory = checkpointing.checkpoint_dir(workdir)
  assert sorted(os.listdir(directory)) == ["4", "5"]
  for step in (4, 5):
    assert checkpointing.verify_checksums(_step_dir(workdir, step)) is True
  manager = _manager(workdir, max_to_keep=2)
  _, meta = checkpointing.restore(manager, _state(0.0), workdir=workdir)
  manager.close()
  assert meta["step"] == 5 and not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))


_HOLDER = """
import sys
from mian_jax import workdir
with workdir.hold(sys.argv[1]):
  print("locked", flush=True)
  sys.stdin.read()
"""


def _start_holder(workdir):
  child = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], cwd=REPO, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  assert child.stdout.readline().strip() == "locked"
  return child


def test_a_second_run_on_a_locked_workdir_fails_at_once_until_the_first_exits(tmp_path):
  workdir = str(tmp_path / "run")  # created by the holder
  child = _start_holder(workdir)
  try:
    with pytest.raises(WorkdirBusyError) as raised:
      with workdir_lib.hold(workdir):
        pass
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"workdir {workdir} is in use by another run (pid {child.pid} "
                              f"on host {socket.gethostname()} since ")
    assert message.endswith("wait for it to finish or use another --workdir")
  finally:
    child.stdin.close()
    child.wait(timeout=60)
  assert child.returncode == 0
  with workdir_lib.hold(workdir):  # released when the holder exited
    with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()} "):
      with workdir_lib.hold(workdir):  # a second holder in the same process fails too
        pass


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
  workdir = str(tmp_path)
  child = _start_holder(workdir)
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=60)
  with open(workdir_lib.lock_path(workdir)) as f:
    assert f.read().startswith(f"{child.pid} ")  # the file stays, with the dead holder in it
  with workdir_lib.hold(workdir):
    with open(workdir_lib.lock_path(workdir)) as f:
      assert f.read().startswith(f"{os.getpid()} ")
