"""launch/: a real tiny grid sweep (selection, reuse, a changed config), and the summaries."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from launch import ablations, runner, sweep
from tests.helpers import REPO, TINY, markdown_rows

# The tiny config as overrides, validated every 2 of 6 steps.
SWEEP_TINY = [f for f in TINY if not f.startswith("--config.train.eval_every_steps=")] + [
    "--config.train.num_train_steps=6", "--config.train.eval_every_steps=2"]


def test_a_sweep_selects_on_validation_reuses_its_runs_and_refuses_a_changed_config(
    tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  out = tmp_path / "sweep"
  argv = ["--config=configs/synthetic.py", "--models=lr", "--seeds=0,1",
          "--grid=train.learning_rate=1e-3,3e-2", f"--out={out}", "--", *SWEEP_TINY]
  sweep.main(argv)
  printed = capsys.readouterr().out
  assert "run 1/4 lr train.learning_rate=1e-3 seed 0: training" in printed
  assert "run 4/4" in printed and "ETA" in printed

  results = pd.read_csv(out / "results.csv")
  assert len(results) == 4
  assert {"model", "train.learning_rate", "seed", "valid_auc", "test_auc", "test_logloss",
          "test_gauc", "best_step", "oracle_auc"} <= set(results)
  means = results.groupby(["model", "train.learning_rate"]).valid_auc.mean()
  summary = pd.read_csv(out / "summary.csv", index_col="model")
  rows = {row[0]: row for row in markdown_rows((out / "summary.md").read_text())}
  assert set(rows) == {"lr"}  # several models: test_selection_uses_mean_validation_auc_...
  for model in ("lr",):
    best_lr = means[model].idxmax()
    assert summary.loc[model, "train.learning_rate"] == best_lr
    chosen = results[(results.model == model) & (results["train.learning_rate"] == best_lr)]
    assert rows[model][2] == f"{chosen.valid_auc.mean():.4f} ± {chosen.valid_auc.std():.4f}"
    assert rows[model][3] == f"{chosen.test_auc.mean():.4f} ± {chosen.test_auc.std():.4f}"
  assert len(markdown_rows((out / "grid.md").read_text())) == 2
  assert (out / "summary.png").stat().st_size > 1000
  workdir = out / "lr" / "train.learning_rate=1e-3" / "seed0"
  assert "mian_jax.main" in (workdir / "log.txt").read_text()

  def no_training(*args):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(runner, "launch", no_training)
  sweep.main(argv)
  assert capsys.readouterr().out.count("reused (finished, same config)") == 4
  pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)

  with pytest.raises(SystemExit) as stopped:
    sweep.main(argv + ["--config.train.l2_weight=0.01"])
  message = str(stopped.value)
  assert "\n" not in message and message.startswith("error: ")
  assert "train.l2_weight: 0.001 -> 0.01" in message and "--rerun_changed" in message


def test_selection_uses_mean_validation_auc_never_test():
  frame = pd.DataFrame({
      "model": ["mian"] * 4 + ["lr"] * 4, "lr": ["a", "a", "b", "b"] * 2, "seed": [0, 1] * 4,
      # mian: point a has the best single validation run, b the best mean; test favours a.
      "valid_auc": [0.90, 0.60, 0.80, 0.80, 0.70, 0.70, 0.60, 0.60],
      "test_auc": [0.95, 0.95, 0.70, 0.72, 0.66, 0.68, 0.90, 0.90],
      "test_logloss": [0.5] * 8, "test_gauc": [0.6] * 8, "oracle_auc": [0.99] * 8})
  grid, summary = sweep.select(frame, ["lr"])
  assert summary.loc["mian", "lr"] == "b" and summary.loc["lr", "lr"] == "a"
  assert summary.loc["lr", "delta_test_auc"] == pytest.approx(0.67 - 0.71)
  assert grid.selected.tolist() == [False, True, True, False]
  assert markdown_rows(sweep.summary_markdown(summary, ["lr"], "t"))[0][:4] == [
      "mian", "b", "0.8000 ± 0.0000", "0.7100 ± 0.0141"]


def test_grid_parsing_and_planning():
  keys, points = sweep.parse_grid("train.learning_rate=1e-3,3e-3; model.mlp_dims=(8,4),(16,8)")
  assert keys == ["train.learning_rate", "model.mlp_dims"]
  assert points[1] == (("train.learning_rate", "1e-3"), ("model.mlp_dims", "(16,8)"))
  runs = sweep.plan(["mian", "w/o IBIM"], points, [0, 1], "/o", ["--config.train.l2_weight=0"])
  assert len(runs) == 16
  assert runs[0].workdir == "/o/mian/train.learning_rate=1e-3,model.mlp_dims=(8,4)/seed0"
  assert runs[-1].workdir.startswith("/o/w_o_IBIM/")
  assert runs[0].flags() == ["--config.train.seed=0", "--config.model.name=mian",
                             "--config.train.learning_rate=1e-3", "--config.model.mlp_dims=(8,4)",
                             "--config.train.l2_weight=0"]
  with pytest.raises(runner.LaunchError, match="model.name is set by both 'lr' and the grid"):
    sweep.plan(["lr"], sweep.parse_grid("model.name=din")[1], [0], "/o", [])
  with pytest.raises(runner.LaunchError, match="train.seed is set by both"):
    sweep.plan(["lr"], [()], [0], "/o", ["--config.train.seed=3"])


def test_a_changed_workdir_stops_with_its_keys_or_is_moved_aside(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  run = runner.Run("lr", (), 0, str(tmp_path / "run"), ("--config.model.name=lr",))
  requested = runner.resolve_config("configs/synthetic.py", run.flags())
  recorded = json.loads(json.dumps(requested))
  recorded["model"]["embed_dim"] = 99
  os.makedirs(run.workdir)
  with open(os.path.join(run.workdir, "config.json"), "w") as f:
    json.dump(recorded, f)
  runner.check_workdirs([run], [recorded], rerun_changed=False)  # equal: nothing to say
  with pytest.raises(runner.LaunchError, match=r"\(model.embed_dim: 99 -> 16\); pass"):
    runner.check_workdirs([run], [requested], rerun_changed=False)
  lines = []
  runner.check_workdirs([run], [requested], rerun_changed=True, echo=lines.append)
  assert not os.path.exists(run.workdir) and len(os.listdir(tmp_path)) == 1
  assert "moved to" in lines[0]
  with pytest.raises(runner.LaunchError, match="unknown config key|trian"):
    runner.resolve_config("configs/synthetic.py", ["--config.trian.seed=1"])


def test_build_command_carries_seed_and_overrides():
  cmd = runner.build_command("configs/synthetic.py", "/w", 3, ["--config.model.use_gim=False"])
  assert cmd[1:3] == ["-m", "mian_jax.main"]
  assert "--config.train.seed=3" in cmd and cmd[-1] == "--config.model.use_gim=False"


def _ablation_frame(oracle):
  return pd.DataFrame({
      "variant": ["mian", "mian", "w/o IBIM", "w/o IBIM"], "seed": [0, 1, 0, 1],
      "valid_auc": [0.81, 0.83, 0.71, 0.73], "test_auc": [0.80, 0.82, 0.70, 0.72],
      "test_gauc": [0.7] * 4, "test_logloss": [0.5] * 4, "oracle_auc": [oracle] * 4})


def test_ablation_summary_is_relative_to_the_first_variant_a_table_and_a_plot(tmp_path):
  summary = ablations.summarise(_ablation_frame(0.9))
  assert list(summary.index) == ["mian", "w/o IBIM"]
  assert summary.loc["w/o IBIM", "delta_auc"] == pytest.approx(-0.10)
  assert summary.loc["mian", "auc_std"] == pytest.approx(0.01414, abs=1e-4)
  rows = markdown_rows(ablations.summary_markdown(summary))
  assert rows[1][:3] == ["w/o IBIM", "0.7100 ± 0.0141", "-0.1000"]
  ablations.plot(summary, str(tmp_path / "a.png"))
  assert (tmp_path / "a.png").stat().st_size > 1000


def test_plot_without_an_oracle_or_with_one_far_off(tmp_path):
  for oracle in (np.nan, 0.99):
    ablations.plot(ablations.summarise(_ablation_frame(oracle)), str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_every_registered_model_is_a_variant_and_swept_by_default():
  from mian_jax.models import MODELS
  assert set(MODELS) <= set(ablations.VARIANTS)
  assert set(sweep.MODELS) == set(MODELS)
