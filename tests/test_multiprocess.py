"""Two real processes (launch/local.py: JAX's distributed runtime on 127.0.0.1, gloo CPU
collectives, one CPU device each) train, evaluate and checkpoint through `python -m
mian_jax.main`, and end where one process with the same two devices ends."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mian_jax import recorded_config, train
from mian_jax import workdir as workdir_lib
from tests.helpers import REPO, TINY, tiny_config

pytestmark = pytest.mark.slow  # real runs, several processes or devices: `pytest -m slow`

STEPS = 8
SCHEDULE = {"train.num_train_steps": STEPS, "train.eval_every_steps": STEPS,
            "checkpoint.every_steps": STEPS}  # dropout stays on (0.2): its bits must agree too


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same run in this process (two CPU devices) and in two processes with one each."""
  tmp = tmp_path_factory.mktemp("multiprocess")
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp / "cache"), MIAN_JAX_COMPILATION_CACHE="")
  env.pop("MIAN_JAX_DISTRIBUTED", None)
  flags = [f"--config.{key}={value}" for key, value in SCHEDULE.items()]
  two = subprocess.run(
      [sys.executable, "-m", "launch.local", "--num_processes=2", "--cpu_devices_per_process=1",
       "--timeout=240", "--", "--config=configs/synthetic.py", *TINY, *flags,
       f"--workdir={tmp}/two"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert two.returncode == 0, two.stdout[-5000:]
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", str(tmp / "cache"))
    assert jax.device_count() == 2 and jax.process_count() == 1
    train.train_and_evaluate(tiny_config(**SCHEDULE), str(tmp / "one"))
  return tmp, two


def _final_params(workdir, cache):
  """(step, {path: array}) of the latest checkpoint, restored in this (one) process."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", cache)
    _, state, _ = workdir_lib.restore_run(str(workdir))
  step = int(jax.device_get(state.step))
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  return step, {jax.tree_util.keystr(path): np.asarray(value) for path, value in flat}


def test_two_processes_end_where_one_process_with_two_devices_ends(runs):
  tmp, _ = runs
  for split in ("valid", "test"):
    with open(tmp / "one" / "eval" / f"{split}_metrics.json") as f:
      one = json.load(f)
    with open(tmp / "two" / "eval" / f"{split}_metrics.json") as f:
      two = json.load(f)
    for key in ("auc", "logloss", "gauc"):
      assert two[key] == pytest.approx(one[key], rel=0, abs=1e-6), (split, key)
  step_one, params_one = _final_params(tmp / "one", str(tmp / "cache"))
  step_two, params_two = _final_params(tmp / "two", str(tmp / "cache"))
  assert step_one == step_two == STEPS
  assert params_one.keys() == params_two.keys()
  for name, value in params_one.items():
    np.testing.assert_allclose(params_two[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_each_process_read_only_its_own_rows(runs):
  _, two = runs
  counts = re.findall(r"\[p(\d)\] .*Process (\d) of 2 read (\d+) training rows", two.stdout)
  # 8 steps of a global batch of 16: 8 rows per step each, none twice.
  assert sorted((a, b, int(n)) for a, b, n in counts) == [("0", "0", 64), ("1", "1", 64)]


def test_only_process_0_writes_metrics_and_evaluation_files(runs):
  tmp, _ = runs
  names = lambda root: sorted(  # noqa: E731 (an event file's name holds its time and pid)
      re.sub(r"tfevents\..*", "tfevents", os.path.relpath(os.path.join(d, f), root))
      for d, _, fs in os.walk(root) for f in fs if "checkpoints" not in d)
  assert names(tmp / "two") == names(tmp / "one")
  with open(tmp / "two" / "metrics" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  steps = [(r["step"], tuple(sorted(r))) for r in rows]
  assert len(steps) == len(set(steps))  # no row written twice (by a second process)


def test_a_two_process_checkpoint_resumes_in_one_process_and_trains_on(runs, tmp_path):
  """Restore on another topology: the checkpoint of 2 processes x 1 device continues in this
  one process (2 devices), from step 8 to 12."""
  tmp, _ = runs
  workdir = str(tmp_path / "resumed")
  shutil.copytree(tmp / "two", workdir)
  config = recorded_config.get_config(workdir)
  config.train.num_train_steps = STEPS + 4
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", str(tmp / "cache"))
    results = train.train_and_evaluate(config, workdir)
  # It trained on to step 12; the reported step is the best validation step, 8 or 12.
  assert results["test"]["last_step"] == STEPS + 4
  assert results["test"]["step"] in (STEPS, STEPS + 4)
  with open(os.path.join(workdir, "metrics", "metrics.jsonl")) as f:
    losses = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
  assert losses == [4, 8, 12]
