"""The command lines as a user types them: main, resume, evaluate, and one-line errors."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # the tests' tiny_config, as command-line overrides
    "--config.data.synthetic.num_users=60", "--config.data.synthetic.num_items=40",
    "--config.data.synthetic.num_categories=5", "--config.data.synthetic.num_occupations=6",
    "--config.data.synthetic.num_train=1024", "--config.data.synthetic.num_valid=256",
    "--config.data.synthetic.num_test=256", "--config.data.synthetic.min_seq_len=2",
    "--config.data.synthetic.short_seq_len=1", "--config.data.synthetic.recent_window=3",
    "--config.data.max_seq_len=6", "--config.model.embed_dim=4", "--config.model.num_heads=2",
    "--config.model.gim_dim=8", "--config.model.mlp_dims=(8,4)", "--config.train.batch_size=16",
    "--config.train.log_every_steps=4", "--config.train.eval_every_steps=4",
    "--config.eval.batch_size=64", "--config.checkpoint.every_steps=4",
]


def run(module, *args, tmp_path):
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"))
  return subprocess.run([sys.executable, "-m", module, "--config=configs/synthetic.py", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_main_resumes_and_evaluate_restores_its_checkpoint(tmp_path):
  workdir = f"--workdir={tmp_path / 'run'}"
  first = run("mian_jax.main", workdir, *TINY, "--config.train.num_train_steps=8",
              tmp_path=tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "starting from scratch" in first.stderr and "samples/s" in first.stderr
  second = run("mian_jax.main", workdir, *TINY, "--config.train.num_train_steps=12",
               tmp_path=tmp_path)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "Resumed from step 8" in second.stderr
  assert "Training 8 -> 12 steps" in second.stderr

  reported = (tmp_path / "run" / "eval" / "valid_metrics.json").read_text()
  evaluated = run("mian_jax.evaluate", workdir, *TINY, "--step=8", "--split=valid",
                  "--predictions", tmp_path=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert (tmp_path / "run" / "eval" / "valid_metrics.json").read_text() == reported
  with open(tmp_path / "run" / "eval" / "valid_metrics_step8.json") as f:
    metrics = json.load(f)
  assert metrics["step"] == 8 and metrics["num_examples"] == 256
  assert {"auc", "logloss", "gauc", "oracle_auc"} <= set(metrics)
  frame = pd.read_parquet(tmp_path / "run" / "eval" / "valid_predictions_step8.parquet")
  assert len(frame) == 256
  assert {"score", "label", "group_id", "attention_ibim", "attention_gim"} <= set(frame)
  assert len(frame["attention_gim"][0]) == 7
  assert frame["score"].between(0, 1).all()


@pytest.mark.parametrize("args,message", [
    (["--config.trian.batch_size=1"], "unknown config key 'trian'"),
    (["--config.model.num_heads=abc"], "invalid literal for int()"),
    (["--config.model.transformer=postln"], "config.model.transformer='postln' is not one of"),
    (["--config.model.num_heads=3"], "must divide the behaviour width"),
    (["--config.data.source=prepared", "--config.data.prepared_dir=/nonexistent/dir"],
     "no prepared data at /nonexistent/dir"),
])
def test_bad_input_gives_a_one_line_error(tmp_path, args, message):
  result = run("mian_jax.main", f"--workdir={tmp_path / 'bad'}", *TINY, *args, tmp_path=tmp_path)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr[-1500:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "bad" / "checkpoints").exists() or not os.listdir(tmp_path / "bad" /
                                                                           "checkpoints")


def test_evaluate_without_checkpoints_is_a_clear_error(tmp_path):
  result = run("mian_jax.evaluate", f"--workdir={tmp_path / 'empty'}", *TINY, tmp_path=tmp_path)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: no checkpoints in")
