"""Selection at the best validation step: checkpoints_best, report_step, resume, early stopping."""

import json
import os
import shutil

import numpy as np
import pytest

from mian_jax import checkpointing, config_checks, evaluate, train, writers
from mian_jax.errors import ConfigError
from tests.helpers import tiny_config

METRIC_KEYS = ("auc", "gauc", "logloss", "oracle_auc", "num_examples", "step")


def _config(**overrides):
  return tiny_config(**{"train.num_train_steps": 12, "train.eval_every_steps": 2,
                        "train.learning_rate": 1e-2, **overrides})


def _valid_aucs(workdir):
  """[(step, valid AUC)] in the order validation ran, from metrics.jsonl."""
  records = writers.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl"))
  return [(r["step"], r["valid/auc"]) for r in records if "valid/auc" in r]


def _best_steps(workdir):
  return sorted(int(s) for s in os.listdir(checkpointing.checkpoint_dir(workdir, best=True))
                if s.isdigit())


def _read(workdir, name):
  with open(os.path.join(workdir, "eval", name)) as f:
    return json.load(f)


def test_best_step_is_the_argmax_of_validation_and_evaluate_reproduces_its_test_metrics(tmp_path):
  workdir = str(tmp_path)
  # Logistic regression at a learning rate too high for it: validation AUC peaks at step 2,
  # 0.05 above any later step. max_to_keep=1: that step's regular checkpoint is long gone.
  config = _config(**{"model.name": "lr", "train.learning_rate": 0.3,
                      "checkpoint.max_to_keep": 1})
  results = train.train_and_evaluate(config, workdir)
  history = _valid_aucs(workdir)
  assert [s for s, _ in history] == [2, 4, 6, 8, 10, 12]
  best_step, best_auc = history[int(np.argmax([a for _, a in history]))]
  assert best_step != 12, "the test needs a run whose validation AUC peaks before the end"
  assert _best_steps(workdir) == [best_step]

  test, valid = _read(workdir, "test_metrics.json"), _read(workdir, "valid_metrics.json")
  for metrics in (test, valid, results["test"]):
    assert metrics["step"] == best_step and metrics["selected"] == "best"
    assert metrics["best_valid_auc"] == best_auc and metrics["last_step"] == 12
  assert valid["auc"] == best_auc  # the reported validation AUC is the one selection saw
  assert _read(workdir, f"test_metrics_step{best_step}.json") == test

  again = evaluate.evaluate_checkpoint(config, workdir, "best", "test", with_predictions=False)
  assert {k: again[k] for k in METRIC_KEYS} == {k: test[k] for k in METRIC_KEYS}
  assert _read(workdir, "test_metrics.json") == test  # evaluate wrote its own step-stamped file

  # Rerunning the finished run with report_step="last" trains nothing and reports step 12.
  config.eval.report_step = "last"
  last = train.train_and_evaluate(config, workdir)
  assert last["test"]["step"] == 12 and last["test"]["selected"] == "last"
  assert last["test"]["best_step"] == best_step and len(_valid_aucs(workdir)) == len(history)
  assert _read(workdir, f"test_metrics_step{best_step}.json")["step"] == best_step


@pytest.mark.slow
def test_a_resumed_run_keeps_its_best_checkpoint(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  expected = train.train_and_evaluate(_config(), straight)
  train.train_and_evaluate(_config(**{"train.num_train_steps": 6}), resumed)
  results = train.train_and_evaluate(_config(), resumed)
  assert _best_steps(resumed) == _best_steps(straight) == [expected["test"]["step"]]
  for key in ("auc", "logloss", "step", "best_valid_auc", "best_step"):
    assert results["test"][key] == expected["test"][key], key


@pytest.mark.slow
def test_a_best_checkpoint_newer_than_the_resumed_one_is_redone(tmp_path, monkeypatch):
  monkeypatch.setattr(train, "improves", lambda auc, best: True)  # every validation is a best
  straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
  expected = train.train_and_evaluate(_config(), straight)
  train.train_and_evaluate(_config(), crashed)
  # As if the process died after saving best step 12 but before regular checkpoint 12.
  shutil.rmtree(os.path.join(crashed, "checkpoints", "12"))
  assert _best_steps(crashed) == [12]
  results = train.train_and_evaluate(_config(), crashed)  # resumes from 8
  assert _best_steps(crashed) == [12]
  assert results["test"]["step"] == 12
  assert results["test"]["auc"] == expected["test"]["auc"]


def test_early_stopping_stops_after_patience_validations_without_a_better_auc(tmp_path):
  workdir, patience = str(tmp_path), 2
  config = _config(**{"train.num_train_steps": 40, "train.learning_rate": 1e-3,
                      "train.early_stopping_patience": patience})
  results = train.train_and_evaluate(config, workdir)
  history = _valid_aucs(workdir)
  best, since, expected_stop = -1.0, 0, None
  for step, auc in history:  # the rule, replayed on the logged AUCs
    best, since = (auc, 0) if auc > best else (best, since + 1)
    if since == patience:
      expected_stop = step
      break
  assert expected_stop is not None and expected_stop < 40
  assert history[-1][0] == expected_stop  # no validation after the stop
  assert results["test"]["last_step"] == expected_stop
  manager = checkpointing.create_manager(workdir, config.checkpoint, read_only=True)
  assert manager.latest_step() == expected_stop
  manager.close()
  # Rerunning the same command does not train on.
  again = train.train_and_evaluate(config, workdir)
  assert again["test"]["last_step"] == expected_stop and len(_valid_aucs(workdir)) == len(history)


@pytest.mark.parametrize("key,value,message", [
    ("eval.report_step", "final", "config.eval.report_step='final' is not one of"),
    ("train.early_stopping_patience", -1, "early_stopping_patience must be >= 0"),
    ("eval.periodic_valid_examples", -1, "periodic_valid_examples must be >= 0"),
    ("train.eval_every_epochs", 0.5, r"train.eval_every_steps=4 and "
     r"train.eval_every_epochs=0.5: set exactly one of them > 0"),
    ("train.eval_every_steps", 0, r"train.eval_every_steps=0 and train.eval_every_epochs=0: "
     "set exactly one"),
    ("train.eval_every_epochs", -0.5, "eval_every_epochs must be >= 0"),
])
def test_bad_selection_settings_are_rejected(key, value, message):
  with pytest.raises(ConfigError, match=message) as error:
    config_checks.check_config(tiny_config(**{key: value}))
  assert "\n" not in str(error.value)


def test_the_validation_subsample_is_whole_groups_of_a_seeded_draw():
  group_id = np.random.default_rng(0).integers(0, 50, 1000)
  rows = evaluate.valid_subsample(group_id, 300, seed=0)
  assert np.array_equal(rows, evaluate.valid_subsample(group_id, 300, seed=0))
  assert not np.array_equal(rows, evaluate.valid_subsample(group_id, 300, seed=1))
  assert np.all(np.diff(rows) > 0)  # split order
  chosen = np.unique(group_id[rows])
  assert np.array_equal(np.flatnonzero(np.isin(group_id, chosen)), rows)  # whole groups
  sizes = {g: int(np.sum(group_id == g)) for g in chosen}
  assert len(rows) >= 300 and min(len(rows) - n for n in sizes.values()) < 300  # just enough
  assert evaluate.valid_subsample(group_id, 0, seed=0) is None
  assert evaluate.valid_subsample(group_id, 1000, seed=0) is None


def _spy_on_evaluate_split(monkeypatch):
  """A list that gets (split, step, rows or None) of every evaluate_split call."""
  calls, original = [], evaluate.evaluate_split

  def spy(run, state, split, step, writer=None, rows=None):
    calls.append((split, step, rows))
    return original(run, state, split, step, writer, rows=rows)

  monkeypatch.setattr(evaluate, "evaluate_split", spy)
  return calls


def test_periodic_validation_on_a_subsample_selects_and_the_reported_step_is_validated_once(
    tmp_path, monkeypatch):
  workdir = str(tmp_path)
  calls = _spy_on_evaluate_split(monkeypatch)
  config = _config(**{"model.name": "lr", "train.learning_rate": 0.3,
                      "eval.periodic_valid_examples": 100})
  results = train.train_and_evaluate(config, workdir)
  periodic = [(step, rows) for split, step, rows in calls if split == "valid" and
              rows is not None]
  assert [step for step, _ in periodic] == [2, 4, 6, 8, 10, 12]
  assert all(np.array_equal(rows, periodic[0][1]) for _, rows in periodic)
  assert 100 <= len(periodic[0][1]) < 256

  records = writers.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl"))
  history = [(r["step"], r["valid_subsample/auc"]) for r in records
             if "valid_subsample/auc" in r]
  best_step, best_auc = history[int(np.argmax([a for _, a in history]))]
  assert [s for s, _ in history] == [2, 4, 6, 8, 10, 12] and best_step != 12
  # The reported step, and only it, on the whole split, once, before test.
  assert [(s, step) for s, step, rows in calls if rows is None] == [("valid", best_step),
                                                                    ("test", best_step)]
  valid = _read(workdir, "valid_metrics.json")
  assert valid["step"] == best_step and valid["num_examples"] == 256
  assert valid["best_valid_auc"] == best_auc != valid["auc"]
  assert results["test"]["step"] == best_step
  reported = [r for r in records if "valid/auc" in r]
  assert len(reported) == 1 and reported[0]["step"] == best_step and "test/auc" in reported[0]
  assert reported[0]["valid/auc"] == pytest.approx(valid["auc"])


@pytest.mark.slow  # two runs: ~10 s on a quiet machine, 30 s on a busy one
def test_a_resumed_run_validates_on_the_same_subsample(tmp_path, monkeypatch):
  workdir, subsample = str(tmp_path), {"eval.periodic_valid_examples": 100}
  calls = _spy_on_evaluate_split(monkeypatch)
  train.train_and_evaluate(_config(**subsample, **{"train.num_train_steps": 6}), workdir)
  first = [(step, rows) for _, step, rows in calls if rows is not None]
  calls.clear()
  results = train.train_and_evaluate(_config(**subsample), workdir)  # resumes from step 6
  second = [(step, rows) for _, step, rows in calls if rows is not None]
  assert [s for s, _ in first] == [2, 4, 6] and [s for s, _ in second] == [8, 10, 12]
  assert all(np.array_equal(rows, first[0][1]) for _, rows in first + second)
  assert [(s, step) for s, step, rows in calls if rows is None] == [
      ("valid", results["valid"]["step"]), ("test", results["test"]["step"])]
  records = writers.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl"))
  assert [r["step"] for r in records if "valid_subsample/auc" in r] == [2, 4, 6, 8, 10, 12]
  # One whole-split row, this report's: the first report's was dropped with its test row.
  assert _valid_aucs(workdir) == [(results["valid"]["step"], results["valid"]["auc"])]


@pytest.mark.parametrize("every_epochs,expected", [(0.1, [6, 12, 16]), (0.25, [16])])
def test_eval_every_epochs_validates_at_that_fraction_of_an_epoch(tmp_path, every_epochs,
                                                                  expected):
  # 1024 training examples in batches of 16: 64 steps an epoch; 0.1 epoch = 6.4 -> 6 steps.
  config = _config(**{"train.num_train_steps": 16, "train.eval_every_steps": 0,
                      "train.eval_every_epochs": every_epochs})
  assert train.validation_every(config.train, 64) == round(every_epochs * 64)
  train.train_and_evaluate(config, str(tmp_path))
  assert [s for s, _ in _valid_aucs(str(tmp_path))] == expected
