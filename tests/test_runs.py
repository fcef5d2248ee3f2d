"""Runs a user can trust (issue 11): a workdir's identity, preemption, one writer per workdir,
nothing non-finite saved or reported, quiet logs, and bad settings refused before any work.

Signals and concurrency go through real `python -m mian_jax.main` subprocesses; the rest calls
the same functions the entry points call.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mian_jax import checkpointing, evaluate, train, workdir as workdir_lib, writers
from mian_jax.errors import ConfigError, DataError, NonFiniteLossError
from tests.helpers import REPO, TINY, tiny_config


def _steps(directory):
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def _popen(workdir, *args, tmp_path, log_name="log.txt"):
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"))
  log = open(tmp_path / log_name, "w")
  process = subprocess.Popen(
      [sys.executable, "-m", "mian_jax.main", "--config=configs/synthetic.py",
       f"--workdir={workdir}", *TINY, *args], cwd=REPO, env=env, stdout=log,
      stderr=subprocess.STDOUT, text=True)
  return process, tmp_path / log_name


def _wait_for(path, text, process, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if text in path.read_text():
      return
    if process.poll() is not None:
      raise AssertionError(f"exited {process.returncode} before {text!r}: "
                           f"{path.read_text()[-2000:]}")
    time.sleep(0.1)
  process.kill()
  raise AssertionError(f"no {text!r} within {timeout} s: {path.read_text()[-2000:]}")


# ----------------------------------------------------------------------------- identity (1, 5, 12)


def test_a_rerun_with_another_model_stops_and_moves_nothing(tmp_path):
  """Problem 1: the mismatch used to mark the checkpoint damaged and train MIAN from scratch."""
  workdir = str(tmp_path / "din")
  train.train_and_evaluate(tiny_config(**{"model.name": "din"}), workdir)
  before = {name: (tmp_path / "din" / name).read_bytes()
            for name in ("config.json", "eval/test_metrics.json")}
  with pytest.raises(ConfigError, match=r"another config \(.*model\.name: 'din' -> 'mian'"):
    train.train_and_evaluate(tiny_config(), workdir)
  with pytest.raises(ConfigError, match=r"model\.num_heads: 2 -> 4"):
    train.train_and_evaluate(tiny_config(**{"model.name": "din", "model.num_heads": 4}), workdir)
  with pytest.raises(ConfigError, match="model.name"):
    evaluate.evaluate_checkpoint(tiny_config(), workdir, "latest", "test", False)
  assert not os.path.exists(tmp_path / "din" / "checkpoints_damaged")
  assert _steps(checkpointing.checkpoint_dir(workdir)) == [4, 8]
  for name, content in before.items():
    assert (tmp_path / "din" / name).read_bytes() == content


@pytest.mark.slow
def test_resumable_keys_may_change_and_other_data_may_not(tmp_path):
  """Problems 7 and 12: a longer budget resumes; other data (seed, size) stops with its key."""
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(), workdir)
  results = train.train_and_evaluate(
      tiny_config(**{"train.num_train_steps": 12, "train.log_every_steps": 2,
                     "eval.batch_size": 32}), workdir)
  assert results["test"]["last_step"] == 12
  for key, value in (("data.synthetic.seed", 7), ("data.synthetic.num_train", 2048),
                     ("data.synthetic.num_items", 50)):
    with pytest.raises(ConfigError, match=rf"{key}: \d+ -> {value}"):
      train.train_and_evaluate(tiny_config(**{key: value, "train.num_train_steps": 12}), workdir)


_CSV_HEADER = "user_id,ts,clicked,item_id,category,price,age_group,gender,city,hour,device"
# configs/tabular.py shrunk like TINY (the CSV path is given per run).
_TABULAR = ["--config=configs/tabular.py", "--config.data.max_seq_len=4",
            "--config.data.max_bad_row_ratio=0", "--config.model.embed_dim=4",
            "--config.model.num_heads=2", "--config.model.gim_dim=8",
            "--config.model.mlp_dims=(8,4)", "--config.train.batch_size=16",
            "--config.train.num_train_steps=6", "--config.train.log_every_steps=3",
            "--config.train.eval_every_steps=3", "--config.eval.batch_size=64",
            "--config.checkpoint.every_steps=3"]


def _write_log(path, num_items, num_rows=200):
  """A click log of 20 users over `num_items` items (seeded), one row a minute."""
  rng = np.random.default_rng(0)
  lines = [_CSV_HEADER]
  for k in range(num_rows):
    user, item = int(rng.integers(0, 20)), int(rng.integers(0, num_items))
    lines.append(f"u{user},{1_600_000_000 + 60 * k},{int(rng.random() < 0.5)},i{item},"
                 f"c{item % 5},{item / 10:.1f},{user % 3},{'FM'[user % 2]},x{user % 4},"
                 f"{k % 24},ios")
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _main(*args, tmp_path):
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"))
  return subprocess.run([sys.executable, "-m", "mian_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _files(directory):
  """{relative path: (bytes, mtime_ns)} of every file under `directory` (the lock file aside)."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if name != ".lock":
        with open(path, "rb") as f:
          out[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
  return out


@pytest.mark.slow
def test_a_resume_on_a_log_with_more_items_stops_and_keeps_the_run(tmp_path):
  """Issue 23, 1: the item table grew (402 -> 1002 rows), orbax's restore failed on the shape,
  the good checkpoints went to checkpoints_damaged/ and a new run replaced the old one's
  results, with exit status 0."""
  workdir = str(tmp_path / "run")
  first = _main(*_TABULAR, f"--config.data.tabular.path={_write_log(tmp_path / 'a.csv', 30)}",
                f"--workdir={workdir}", tmp_path=tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  before = _files(workdir)
  assert {"config.json", "metrics/metrics.jsonl", "eval/test_metrics.json"} <= set(before)
  # The rerun as a user types it: the workdir's recorded config, another log (a resumable key).
  more_items = _write_log(tmp_path / "b.csv", 60)
  rerun = _main(f"--workdir={workdir}", f"--config.data.tabular.path={more_items}",
                tmp_path=tmp_path)
  assert rerun.returncode == 1, rerun.stderr[-2000:]
  assert "Traceback" not in rerun.stderr
  last = rerun.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint 6 in ") and "trained on other data" in last, last
  assert re.search(r"table item_id has \d+ rows for this data, \d+ in the checkpoint", last)
  assert "nothing was moved" in last and "another --workdir" in last
  assert _files(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
  # True damage is still damage: a corrupt newest step on its own data is set aside and the
  # run resumes from the older one.
  newest = os.path.join(checkpointing.checkpoint_dir(workdir), "6")
  array_files = [os.path.join(root, n) for root, _, names in os.walk(newest) for n in names
                 if os.path.basename(root) == "d"]
  with open(max(array_files, key=os.path.getsize), "r+b") as f:
    f.seek(8)
    f.write(b"\xff" * 16)
  resumed = _main(f"--workdir={workdir}", tmp_path=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "step 6 is damaged" in resumed.stderr and "steps 3 -> 6" in resumed.stderr
  assert [n.split("-")[0] for n in os.listdir(os.path.join(workdir, "checkpoints_damaged"))] == [
      "6"]


def test_a_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a directory"):
    train.train_and_evaluate(tiny_config(), str(path))


# ----------------------------------------------------------------------------- signals (3, 11)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_rerun_resumes_there(tmp_path):
  """Problem 3: SIGTERM at step 150 used to lose the steps after the checkpoint at 100."""
  signum = signal.SIGTERM
  workdir = tmp_path / "run"
  many = ["--config.train.num_train_steps=100000", "--config.checkpoint.every_steps=100000",
          "--config.train.eval_every_steps=100000"]
  process, log = _popen(workdir, *many, tmp_path=tmp_path)
  _wait_for(log, "step 8/", process)
  process.send_signal(signum)
  assert process.wait(timeout=120) == 128 + signum, log.read_text()[-2000:]
  text = log.read_text()
  assert f"stopped by {signal.Signals(signum).name} at step" in text and "Traceback" not in text
  (saved,) = _steps(checkpointing.checkpoint_dir(str(workdir)))
  assert saved >= 8
  resumed, log2 = _popen(workdir, *many[1:], f"--config.train.num_train_steps={saved + 4}",
                         tmp_path=tmp_path, log_name="log2.txt")
  assert resumed.wait(timeout=300) == 0, log2.read_text()[-2000:]
  assert f"steps {saved:,} -> {saved + 4:,}" in log2.read_text()


def test_sigint_asks_for_a_stop_and_a_second_one_gets_the_previous_handler():
  # A signal may reach another thread first; Python runs its handler in the main thread at a
  # later check, so each kill is followed by an (interruptible) sleep. Python's own SIGINT
  # handler is installed first, whatever an earlier test left.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  with train.StopSignals(sync_every=1) as signals:
    assert signals.requested(1) == 0
    os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt
    time.sleep(0.2)
    assert signals.requested(2) == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_fails_at_once_naming_the_first(tmp_path):
  """Problem 11: two runs on one workdir used to hang in orbax and lose the final checkpoint."""
  workdir = tmp_path / "run"
  first, log = _popen(workdir, "--config.train.num_train_steps=100000", tmp_path=tmp_path)
  try:
    _wait_for(log, "step 4/", first)
    second, log2 = _popen(workdir, "--config.train.num_train_steps=8", tmp_path=tmp_path,
                          log_name="log2.txt")
    assert second.wait(timeout=120) == 1
    last = log2.read_text().strip().splitlines()[-1]
    assert last.startswith("error: ") and f"pid {first.pid}" in last, last
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
  assert not [d for d in os.listdir(checkpointing.checkpoint_dir(str(workdir)))
              if "tmp" in d]


# ----------------------------------------------------------------------------- integrity (9, 10)


def test_a_non_finite_state_is_never_saved(tmp_path):
  """Problem 9: learning_rate=inf wrote checkpoints/1 with NaN parameters and exited 0. The loss
  of step 1 is finite (computed before the update); the parameters after it are not."""
  config = tiny_config(**{"train.learning_rate": float("inf"), "train.num_train_steps": 1,
                          "checkpoint.every_steps": 1})
  with pytest.raises(NonFiniteLossError, match="not saved|non-finite"):
    train.train_and_evaluate(config, str(tmp_path))
  for directory in (checkpointing.checkpoint_dir(str(tmp_path)),
                    checkpointing.checkpoint_dir(str(tmp_path), best=True)):
    assert not os.path.isdir(directory) or os.listdir(directory) == []
  assert not os.path.exists(tmp_path / "eval" / "test_metrics.json")


def test_a_diverged_run_stops_instead_of_reporting_auc_one_half(tmp_path):
  """Problem 15: a loss of 4e16 at learning_rate=1e3 ended with exit 0 and AUC 0.5."""
  config = tiny_config(**{"train.learning_rate": 1e3, "train.num_train_steps": 40})
  with pytest.raises(NonFiniteLossError, match="diverged"):
    train.train_and_evaluate(config, str(tmp_path))


def test_metrics_files_are_strict_json(tmp_path):
  path = str(tmp_path / "m.json")
  writers.write_json_atomic(path, {"auc": float("nan"), "step": np.int64(3),
                                 "nested": {"x": np.float32("inf")}})
  with open(path) as f:
    assert json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {
        "auc": None, "step": 3, "nested": {"x": None}}


def test_non_finite_scores_are_refused_by_the_metrics():
  predictions = {"prob": np.array([0.2, np.nan, 0.7]), "label": np.array([0, 1, 1]),
                 "group_id": np.array([1, 1, 1])}
  with pytest.raises(NonFiniteLossError, match="1 of 3 examples"):
    evaluate.split_metrics(predictions)


# ----------------------------------------------------------------------------- logs (7)


@pytest.mark.slow
def test_a_resume_writes_no_step_twice_and_a_smaller_budget_is_said_plainly(tmp_path, caplog):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(**{"train.num_train_steps": 12}), workdir)
  # As if killed after step 12 was logged but before its checkpoint landed.
  checkpoints = checkpointing.checkpoint_dir(workdir)
  os.rename(os.path.join(checkpoints, "12"), str(tmp_path / "12-aside"))
  train.train_and_evaluate(tiny_config(**{"train.num_train_steps": 12}), workdir)
  records = writers.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl"))
  keys = [(r["step"], tuple(sorted(r))) for r in records]
  assert len(keys) == len(set(keys)) and max(r["step"] for r in records) == 12
  with caplog.at_level("INFO"):
    train.train_and_evaluate(tiny_config(**{"train.num_train_steps": 8}), workdir)
  text = caplog.text
  assert "already at step 12" in text and "12 -> 8" not in text
  assert "Done: test AUC" in text and os.path.join(workdir, "eval") in text


def test_metric_rows_after_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "x": 1.0}) + "\n" for s in (4, 8, 12)) +
                  json.dumps({"step": 4, "test/auc": 0.7}) + "\n" + '{"step": 16, "x"')
  assert writers.drop_rows_after(str(path), 8) == 3
  assert [r["step"] for r in writers.read_jsonl(str(path))] == [4, 8]


# ----------------------------------------------------------------------------- refused early (15)


def test_a_budget_of_zero_steps_is_refused(tmp_path):
  config = tiny_config(**{"train.num_train_steps": -1, "train.num_epochs": 0.001})
  with pytest.raises(ConfigError, match="is 0 steps"):
    train.train_and_evaluate(config, str(tmp_path))


def test_an_unknown_model_is_refused_before_any_data_is_prepared(tmp_path, monkeypatch):
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(ConfigError, match="model.name='nonexistent'"):
    train.train_and_evaluate(tiny_config(**{"model.name": "nonexistent"}), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "cache" / "prepared")


def test_a_corrupt_test_split_is_found_before_training(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path / "cache"))
  config = tiny_config()
  from mian_jax import data as data_lib  # noqa: PLC0415
  data_dir, _ = data_lib.ensure_prepared(config.data)
  label = os.path.join(data_dir, "test", "label.npy")
  values = np.load(label)
  values[3] = 7.0  # a label that is not 0 or 1
  np.save(label, values)
  with caplog.at_level("INFO"), pytest.raises(DataError, match="test"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert "samples/s" not in caplog.text


def test_with_recorded_config_adds_the_workdirs_config_only_when_none_is_given(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  argv = ["main", f"--workdir={tmp_path}", "--config.train.seed=1"]
  assert workdir_lib.with_recorded_config(argv)[1] == (
      f"--config={workdir_lib.RECORDED_CONFIG}:{tmp_path}")
  assert workdir_lib.with_recorded_config(["main", "--config=c.py", f"--workdir={tmp_path}"]) == [
      "main", "--config=c.py", f"--workdir={tmp_path}"]
  assert workdir_lib.with_recorded_config(["main", "--workdir", str(tmp_path / "none")]) == [
      "main", "--workdir", str(tmp_path / "none")]


@pytest.mark.slow
def test_prepared_data_changed_after_preparation_or_other_data_on_resume_is_refused(
    tmp_path, monkeypatch):
  """Problem 12 and "Integrity": the data's checksum is verified and recorded by the run."""
  monkeypatch.setenv("MIAN_JAX_CACHE", str(tmp_path / "cache"))
  from mian_jax import data as data_lib  # noqa: PLC0415
  dirs = [data_lib.ensure_prepared(tiny_config(**{"data.synthetic.seed": seed}).data)[0]
          for seed in (0, 1)]
  on_dir = [tiny_config(**{"data.source": "prepared", "data.prepared_dir": d}) for d in dirs]
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(on_dir[0], workdir)
  with pytest.raises(DataError, match="trained on other data"):
    train.train_and_evaluate(on_dir[1], workdir)  # data.prepared_dir may move, not change
  label = os.path.join(dirs[1], "train", "label.npy")
  values = np.load(label)
  np.save(label, values[::-1].copy())
  with pytest.raises(DataError, match="changed after it was prepared"):
    train.train_and_evaluate(on_dir[1], str(tmp_path / "w2"))


def test_a_recorded_config_without_a_key_of_today_is_a_one_line_error(tmp_path):
  config = tiny_config()
  recorded = json.loads(config.to_json())
  del recorded["eval"]["periodic_valid_examples"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  with pytest.raises(DataError, match=r"lacks eval.periodic_valid_examples: .*older version"):
    workdir_lib.recorded_config(str(tmp_path))
  recorded["eval"]["periodic_valid_examples"] = 0
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  assert workdir_lib.recorded_config(str(tmp_path)).eval.periodic_valid_examples == 0
