"""launch/table4.py, figure5.py and figure6.py: Table 4 from tiny real runs (reused on a rerun),
Figure 5 from metrics.jsonl files, Figure 6 from a run's predictions, and their one-line errors."""

import contextlib
import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from launch import figure5, figure6, runner, table4
from mian_jax import recorded_config, writers
from mian_jax import workdir as workdir_lib
from tests.helpers import REPO, TINY, markdown_rows

pytestmark = pytest.mark.slow  # real runs, several processes or devices: `pytest -m slow`

RUN_TINY = [*TINY, "--config.train.num_train_steps=8"]  # validated at steps 4 and 8


@pytest.fixture(scope="module")
def table4_runs(tmp_path_factory):
  """Table 4 run once for the module (three tiny runs, seed 0); yields (out, printed)."""
  out = tmp_path_factory.mktemp("table4") / "runs"
  with pytest.MonkeyPatch.context() as patch:  # conftest's private data cache, for the module
    patch.setenv("MIAN_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    patch.chdir(REPO)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      table4.main(["--config=configs/synthetic.py", "--seeds=0", f"--out={out}", "--",
                   *RUN_TINY])
  yield out, printed.getvalue()


def test_table4_runs_the_three_variants_writes_its_table_and_reuses_them(
    table4_runs, monkeypatch, capsys):
  out, printed = table4_runs
  assert "run 1/3 mian seed 0: training" in printed and "ETA" in printed
  for slug, transformer in (("mian", "pre_ln"), ("post-LN_Transformer", "post_ln"),
                            ("no_Transformer", "none")):
    with open(out / slug / "seed0" / "config.json") as f:
      assert json.load(f)["model"]["transformer"] == transformer
  rows = markdown_rows((out / "table4.md").read_text())
  assert [r[0] for r in rows] == ["1) MIAN (pre-LN Transformer)", "2) post-LN Transformer",
                                  "3) no Transformer"]
  frame = pd.read_csv(out / "table4.csv")
  for row, (_, run) in zip(rows, frame.iterrows()):
    assert row[2] == f"{run.test_auc:.4f}" and row[4] == f"{run.test_logloss:.4f}"
    assert row[6] == str(int(run.best_step)) and row[7] == f"{run.oracle_auc:.4f}"
  assert rows[0][3] == "" and rows[1][3] == f"{frame.test_auc[1] - frame.test_auc[0]:+.4f}"
  assert (out / "table4.png").stat().st_size > 1000

  def no_training(*args):
    raise AssertionError("a finished run was trained again")

  monkeypatch.chdir(REPO)
  monkeypatch.setattr(runner, "launch", no_training)
  table4.main(["--config=configs/synthetic.py", "--seeds=0", f"--out={out}", "--", *RUN_TINY])
  assert capsys.readouterr().out.count("reused (finished, same config)") == 3
  pd.testing.assert_frame_equal(pd.read_csv(out / "table4.csv"), frame)


@pytest.mark.parametrize("override,message", [
    ("--config.model.transformer=none", "model.transformer is set by both"),
    ("--config.model.name=din", "'mian' resolves to model.name=din"),
    ("--config.eval.report_step=last", "eval.report_step=last; Table 4 needs mian, pre_ln, best"),
])
def test_table4_refuses_overrides_that_change_what_it_compares(tmp_path, monkeypatch,
                                                                override, message):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as stopped:
    table4.main(["--config=configs/synthetic.py", f"--out={tmp_path}", "--", override])
  assert message in str(stopped.value) and "\n" not in str(stopped.value)
  assert not os.listdir(tmp_path)


def test_table4_differences_are_paired_by_seed():
  frame = pd.DataFrame({
      "variant": ["mian"] * 2 + ["post-LN Transformer"] * 2 + ["no Transformer"] * 2,
      "seed": [0, 1, 1, 0, 0, 1], "valid_auc": [0.8] * 6,
      "test_auc": [0.80, 0.84, 0.83, 0.78, 0.70, 0.76], "test_logloss": [0.5] * 6,
      "test_gauc": [0.7] * 6, "best_step": [4, 8, 8, 4, 4, 4], "oracle_auc": [0.9] * 6})
  summary = table4.summarise(frame.iloc[::-1])  # row order does not matter
  assert list(summary.index) == ["mian", "post-LN Transformer", "no Transformer"]
  # post-LN is 0.02 below on seed 0 and 0.01 below on seed 1.
  assert summary.loc["post-LN Transformer", "delta_auc"] == pytest.approx(-0.015)
  assert summary.loc["post-LN Transformer", "delta_auc_std"] == pytest.approx(0.00707, abs=1e-5)
  rows = markdown_rows(table4.table_markdown(summary))
  assert rows[2][:4] == ["3) no Transformer", "0.8000 ± 0.0000", "0.7300 ± 0.0424",
                         "-0.0900 ± 0.0141"]


def _fake_run(workdir, losses, aucs, every=100):
  """metrics.jsonl as training writes it: train scalars every `every` steps, validation every
  2 * `every`."""
  writer = writers.MetricWriter(os.path.join(workdir, "metrics"))
  for k, loss in enumerate(losses, 1):
    writer.write_scalars(k * every, {"train/loss": loss, "train/bce": loss - 0.01})
    if k % 2 == 0:
      writer.write_scalars(k * every, {"valid/auc": aucs[k // 2 - 1], "valid/logloss": 0.5})
  writer.close()


def test_figure5_draws_the_curves_of_every_variant_from_metrics_jsonl(tmp_path):
  runs = tmp_path / "runs"
  steps = np.arange(1, 21)
  for v, name in enumerate(["mian", "post-LN_Transformer", "no_Transformer"]):
    for seed in range(3):
      losses = 0.45 + 0.25 * np.exp(-steps / (3 + v)) + 0.005 * seed
      aucs = 0.85 - 0.01 * v - 0.2 * np.exp(-steps[::2] / 3) + 0.002 * seed
      aucs[7] = 0.90 if v == 0 else aucs[7]  # pre-LN peaks at step 1600
      _fake_run(runs / name / f"seed{seed}", losses, aucs)
  # A resumed run logs steps again: the last record of a step wins.
  writer = writers.MetricWriter(str(runs / "no_Transformer" / "seed0" / "metrics"))
  writer.write_scalars(2000, {"valid/auc": 0.95})
  writer.close()
  _fake_run(runs / "mian" / "seed0.changed-20261129-000000", [9.0] * 4, [0.1] * 2)  # ignored

  best = figure5.main([f"--runs={runs}"])
  rows = {r[0]: r for r in markdown_rows((runs / "figure5.md").read_text())}
  assert list(rows) == ["MIAN (pre-LN Transformer)", "post-LN Transformer", "no Transformer"]
  assert rows["MIAN (pre-LN Transformer)"][1:3] == ["0.9000", "1600"]
  assert rows["MIAN (pre-LN Transformer)"][4] == "1600, 1600, 1600"
  assert rows["no Transformer"][4] == "2000, 2000, 2000"
  last = 0.83 - 0.2 * np.exp(-19 / 3) + 0.002 * np.array([1, 2])  # seeds 1, 2 at step 2000
  assert best.loc["no Transformer", "seed_best_auc_mean"] == pytest.approx((0.95 + last.sum()) / 3)
  assert (best.seeds == 3).all() and (best.last_step == 2000).all()
  assert (runs / "figure5.png").stat().st_size > 10000

  raw = figure5.curves(str(runs), "train/loss")
  assert raw["mian"].shape == (20, 3) and raw["mian"][0].iloc[0] == pytest.approx(0.45 + 0.25 *
                                                                                  np.exp(-1 / 3))
  smoothed = figure5.smooth(pd.Series([1.0, 2.0, 6.0, 4.0, np.nan], index=[1, 2, 3, 4, 5]), 3)
  assert smoothed.tolist()[:4] == pytest.approx([1.5, 3.0, 4.0, 5.0])  # centred: no lag
  assert np.isnan(smoothed.iloc[4])  # a step not logged stays missing

  with pytest.raises(SystemExit) as stopped:
    figure5.main([f"--runs={tmp_path / 'nothing'}"])
  assert "no <variant>/seed<k>/metrics/metrics.jsonl" in str(stopped.value)
  assert "\n" not in str(stopped.value)


def test_figure5_draws_an_existing_table4_directory(table4_runs):
  out, _ = table4_runs
  best = figure5.main([f"--runs={out}"])
  assert list(best.index) == ["mian", "post-LN Transformer", "no Transformer"]
  valid = pd.read_csv(out / "table4.csv").valid_auc
  assert best.seed_best_auc_mean.to_numpy() == pytest.approx(valid.to_numpy())
  assert (out / "figure5.png").stat().st_size > 10000


def test_the_recorded_config_is_the_config_of_the_run(table4_runs, monkeypatch):
  out, _ = table4_runs
  monkeypatch.chdir(REPO)
  workdir = out / "no_Transformer" / "seed0"
  config = recorded_config.get_config(str(workdir))
  run = runner.Run("no Transformer", (), 0, str(workdir),
                   ("--config.model.transformer=none", *RUN_TINY))
  requested = runner.resolve_config("configs/synthetic.py", run.flags())
  assert not workdir_lib.config_differences(json.loads(json.dumps(config.to_dict())), requested)
  assert isinstance(config.model.mlp_dims, tuple) and config.model.mlp_dims == (8, 4)


def test_figure6_draws_gim_weights_from_a_trained_run_and_reuses_its_predictions(
    table4_runs, monkeypatch):
  out, _ = table4_runs
  monkeypatch.chdir(REPO)
  workdir = out / "mian" / "seed0"
  text = figure6.main([f"--workdir={workdir}", "--cases=5", "--seed=1"])
  best_step = json.loads((workdir / "eval" / "test_metrics.json").read_text())["best_step"]
  path = workdir / "eval" / f"test_predictions_step{best_step}.parquet"
  weights = np.stack(pq.read_table(path).column("attention_gim").to_pylist())
  assert weights.shape == (256, 7) and weights.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
  rows = markdown_rows(text)
  assert [r[0] for r in rows] == ["e_i", "e_c", "e_b", "e_u", "R_ibim", "R_iuim", "R_icim"]
  sample = figure6.sample_rows(256, 5, 1)
  for k, row in enumerate(rows):
    assert row[2] == f"{weights[:, k].mean():.4f}"
    assert row[3] == f"{weights[sample, k].mean():.4f}"
  assert (workdir / "figure6.md").read_text() == text
  assert (workdir / "figure6.png").stat().st_size > 10000

  def no_evaluation(*args):
    raise AssertionError("the predictions were computed again")

  monkeypatch.setattr(runner, "launch", no_evaluation)
  assert figure6.main([f"--workdir={workdir}", "--cases=5", "--seed=1"]) == text
  with pytest.raises(SystemExit) as stopped:
    figure6.main([f"--workdir={workdir}", "--step=99"])
  assert str(stopped.value) == (f"error: no checkpoint of step 99 in {workdir}/checkpoints "
                                "(there: [4, 8])")


@pytest.mark.parametrize("model,message", [
    ({"name": "din", "use_gim": True}, "is a din run (model.name=din); Figure 6 shows"),
    ({"name": "mian", "use_gim": False}, "was trained without GIM (model.use_gim=False)"),
    (None, "is not a training workdir (no config.json)"),
])
def test_figure6_refuses_a_run_without_gim_weights_in_one_line(tmp_path, model, message):
  if model is not None:
    (tmp_path / "config.json").write_text(json.dumps({"model": model}))
  with pytest.raises(SystemExit) as stopped:
    figure6.main([f"--workdir={tmp_path}"])
  text = str(stopped.value)
  assert text.startswith("error: ") and message in text and "\n" not in text
  assert os.listdir(tmp_path) == (["config.json"] if model else [])
