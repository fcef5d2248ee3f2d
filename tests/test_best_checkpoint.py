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
  return sorted(int(s) for s in os.listdir(checkpointing.best_checkpoint_dir(workdir))
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


def test_a_resumed_run_keeps_its_best_checkpoint(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  expected = train.train_and_evaluate(_config(), straight)
  train.train_and_evaluate(_config(**{"train.num_train_steps": 6}), resumed)
  results = train.train_and_evaluate(_config(), resumed)
  assert _best_steps(resumed) == _best_steps(straight) == [expected["test"]["step"]]
  for key in ("auc", "logloss", "step", "best_valid_auc", "best_step"):
    assert results["test"][key] == expected["test"][key], key


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
])
def test_bad_selection_settings_are_rejected(key, value, message):
  with pytest.raises(ConfigError, match=message):
    config_checks.check_config(tiny_config(**{key: value}))
