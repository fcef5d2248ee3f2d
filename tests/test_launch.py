"""launch/: the search spaces, the search (faked runs in-process; real tiny ones, killed,
shared by two workers, interrupted, marked slow), runs' reuse and the summaries."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from launch import ablations, runner, search_spaces, sweep
from mian_jax.errors import ConfigError
from tests.helpers import REPO, TINY, markdown_rows

# The tiny config as overrides, validated every 2 of 6 steps.
SWEEP_TINY = [f for f in TINY if not f.startswith("--config.train.eval_every_steps=")] + [
    "--config.train.num_train_steps=6", "--config.train.eval_every_steps=2"]


# ----------------------------------------------------------------------------- the search space


def test_every_models_space_is_declared_valid_and_holds_the_reference_mlp_sizes():
  from mian_jax.models import MODELS
  for model in MODELS:
    space = search_spaces.declared(model)  # raises for a field or a choice the model lacks
    assert "train.learning_rate" in space and "train.l2_weight" in space
  assert (200, 80) in search_spaces.declared("din")["model.mlp_dims"].values
  assert (1024, 512, 256) in search_spaces.declared("wide_deep")["model.mlp_dims"].values
  assert 0.0 in search_spaces.COMMON["train.l2_weight"].values
  assert "model.embed_dim" not in search_spaces.declared("lr")  # LR has no embeddings


def test_a_space_holds_the_configs_own_values_and_leaves_pinned_keys_alone():
  defaults = {"train.learning_rate": 0.05, "model.embed_dim": 12, "model.mlp_dims": [32, 8],
              "model.dropout_rate": 0.2, "train.l2_weight": 1e-3, "train.num_epochs": 1.0,
              "train.num_train_steps": -1, "model.cross_layers": 3,
              "model.sequence_pooling": "mean"}
  space = search_spaces.space_for("dcn", defaults, pinned={"model.dropout_rate"})
  assert "model.dropout_rate" not in space
  assert space["train.learning_rate"] == search_spaces.LogFloat(1e-4, 0.05)
  assert space["model.embed_dim"].values == (8, 16, 32, 12)
  params = search_spaces.default_params(space, defaults)
  assert params["model.mlp_dims"] == "(32,8)"
  assert search_spaces.overrides({"model.mlp_dims": "(36,)", "train.l2_weight": 0.0}) == [
      "--config.model.mlp_dims=(36,)", "--config.train.l2_weight=0.0"]
  capped = search_spaces.space_for("dcn", {**defaults, "train.num_train_steps": 6}, set())
  assert "train.num_epochs" not in capped  # a step cap makes epochs inert


def test_the_docs_show_the_declared_spaces():
  with open(os.path.join(REPO, "docs", "experiments.md")) as f:
    docs = f.read()
  assert search_spaces.markdown_table() in docs


def test_grid_parsing():
  grid = search_spaces.parse_grid("train.learning_rate=1e-3,3e-3; model.mlp_dims=(8,4),(16,8)")
  assert grid["model.mlp_dims"].values == ("(8,4)", "(16,8)")
  assert search_spaces.grid_size(grid) == 4
  with pytest.raises(ConfigError, match="appears twice"):
    search_spaces.parse_grid("a.b=1;a.b=2")


def test_planning_adds_no_test_and_patience_and_refuses_a_key_set_twice(monkeypatch):
  monkeypatch.chdir(REPO)
  (entry,) = sweep.plan(["din"], "configs/synthetic.py", ["--config.model.embed_dim=4"])
  assert "--config.eval.final_test=False" in entry.overrides
  assert "--config.train.early_stopping_patience=3" in entry.overrides
  assert "model.embed_dim" not in entry.space and "model.din_attention_norm" in entry.space
  assert entry.defaults["model.mlp_dims"] == "(32,8)"
  with pytest.raises(runner.LaunchError, match="model.name is set by both 'lr' and the grid"):
    sweep.plan(["lr"], "configs/synthetic.py", [], grid="model.name=din")
  with pytest.raises(runner.LaunchError, match="never evaluates test"):
    sweep.plan(["lr"], "configs/synthetic.py", ["--config.eval.final_test=True"])
  assert sweep.entry_names("mian,lr", "w/o GIM,mian") == ["mian", "lr", "w/o GIM"]


def test_welch_interval_by_hand():
  low, high = sweep.welch_interval([0.80, 0.82, 0.84], [0.70, 0.71])
  # difference 0.115; variances 4e-4 and 5e-5 over 3 and 2 seeds (Welch-Satterthwaite df)
  se = np.sqrt(4e-4 / 3 + 5e-5 / 2)
  df = se ** 4 / ((4e-4 / 3) ** 2 / 2 + (5e-5 / 2) ** 2)
  from scipy import stats
  half = stats.t.ppf(0.975, df) * se
  assert (low, high) == pytest.approx((0.115 - half, 0.115 + half))
  assert np.isnan(sweep.welch_interval([0.8], [0.7, 0.71])[0])


# ----------------------------------------------------------------------------- the search, faked


class FakeRuns:
  """Stands in for runner.launch: `mian_jax.main` writes a validation curve whose AUC is a known
  function of the learning rate and the seed (asking should_stop after each validation),
  `mian_jax.evaluate` writes test metrics. Records every command."""

  def __init__(self):
    self.commands = []

  @staticmethod
  def auc(flags, seed, step):
    lr = float(flags.get("train.learning_rate", 2e-3))
    return 0.8 - 0.05 * abs(np.log10(lr) + 2.5) + 0.01 * seed + 0.001 * step

  def __call__(self, command, log_path, label="", should_stop=None, poll_s=2.0):
    self.commands.append(command)
    flags = dict(a[len("--"):].split("=", 1) for a in command[3:] if "=" in a)
    workdir = flags["workdir"]
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    if command[2] == "mian_jax.evaluate":
      with open(os.path.join(workdir, "eval", "valid_metrics.json")) as f:
        valid = json.load(f)
      result = {"auc": valid["auc"] - 0.05, "logloss": 0.5, "gauc": 0.6, "oracle_auc": 0.9,
                "step": valid["step"]}
      with open(os.path.join(workdir, "eval", f"test_metrics_step{valid['step']}.json"),
                "w") as f:
        json.dump(result, f)
      return 0
    assert flags["config.eval.final_test"] == "False"
    config = {k[len("config."):]: v for k, v in flags.items() if k.startswith("config.")}
    seed = int(config["train.seed"])
    os.makedirs(os.path.join(workdir, "metrics"), exist_ok=True)
    for step in (2, 4, 6):
      with open(os.path.join(workdir, "metrics", "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "valid/auc": self.auc(config, seed, step)}) + "\n")
      if should_stop is not None and should_stop():
        return 143
    with open(os.path.join(workdir, "eval", "valid_metrics.json"), "w") as f:
      json.dump({"auc": self.auc(config, seed, 6), "step": 6, "selected": "best"}, f)
    return 0

  def trained(self):
    return [c for c in self.commands if c[2] == "mian_jax.main"]


@pytest.fixture
def fake(monkeypatch):
  """FakeRuns in place of runner.launch, run from the repository root."""
  monkeypatch.chdir(REPO)
  runs = FakeRuns()
  monkeypatch.setattr(runner, "launch", runs)
  return runs


def sweep_argv(out, *more):
  return ["--config=configs/synthetic.py", "--models=lr,wide_deep", "--seeds=0,1",
          f"--out={out}", *more, "--", *SWEEP_TINY]


def test_a_faked_search_gives_every_model_n_trials_selects_on_validation_and_reads_test_once(
    tmp_path, capsys, fake):
  out = tmp_path / "sweep"
  summary = sweep.main(sweep_argv(out, "--trials=4"))
  printed = capsys.readouterr().out
  assert "ETA" in printed and "lr trial 0 seed 1: done in" in printed
  trials = pd.read_csv(out / "trials.csv")
  assert trials.groupby("model").size().to_dict() == {"lr": 4, "wide_deep": 4}
  assert set(trials.state) == {"COMPLETE"}
  first = trials[trials.number == 0]
  assert set(first.origin) == {"defaults"} and set(first["train.learning_rate"]) == {0.002}
  for model in ("lr", "wide_deep"):
    mine = trials[trials.model == model]
    best = mine.loc[mine.valid_auc_mean.idxmax()]
    assert summary.loc[model, "best_trial"] == best.number
    assert summary.loc[model, "valid_auc_mean"] == pytest.approx(best.valid_auc_mean)
    assert summary.loc[model, "test_auc_mean"] == pytest.approx(best.valid_auc_mean - 0.05)
  csv = pd.read_csv(out / "summary.csv", index_col="model")
  assert {"trials", "valid_auc_mean", "valid_auc_std", "test_auc_mean", "test_auc_std", "seeds",
          "oracle_auc", "delta_test_auc", "delta_ci_low", "delta_ci_high",
          "train.learning_rate"} <= set(csv)
  assert csv.trials.tolist() == [4, 4] and csv.seeds.tolist() == [2, 2]
  assert csv.loc["lr", "delta_test_auc"] == 0  # no MIAN: relative to the first model
  text = (out / "summary.md").read_text()
  assert "Budget: 4 finished trials per model" in text and "each trial 2 seeds" in text
  assert len(markdown_rows(text)) == 2 and (out / "summary.png").stat().st_size > 1000
  evaluated = [c for c in fake.commands if c[2] == "mian_jax.evaluate"]
  assert len(evaluated) == 4 and len(fake.trained()) == 16  # test: best trial x seeds only

  fake.commands.clear()
  sweep.main(sweep_argv(out, "--trials=4"))
  assert fake.commands == []  # every run and every test evaluation reused
  sweep.main(sweep_argv(out, "--trials=5"))
  assert len(fake.trained()) == 4  # one more trial per model, two seeds each
  assert pd.read_csv(out / "trials.csv").groupby("model").size().tolist() == [5, 5]

  with pytest.raises(SystemExit, match="searched with another overrides"):
    sweep.main(sweep_argv(out, "--trials=5") + ["--config.train.l2_weight=0.01"])


def test_a_report_config_retrains_each_best_setting_there_and_reports_only_those_runs(
    tmp_path, monkeypatch, fake):
  calls = []

  def fake_run_all(runs, config_file, rerun_changed=False, echo=print):
    calls.append((config_file, runs))
    return [{"seed": r.seed, "valid_auc": 0.7, "test_auc": 0.6 + 0.01 * r.seed,
             "test_logloss": 0.5, "test_gauc": 0.6, "oracle_auc": 0.9, "step": 6}
            for r in runs]

  monkeypatch.setattr(runner, "run_all", fake_run_all)
  out = tmp_path / "sweep"
  summary = sweep.main(sweep_argv(out, "--trials=3", "--report_config=configs/movielens.py",
                                  "--report_seeds=0,1,2"))
  assert [c for c in fake.commands if c[2] == "mian_jax.evaluate"] == []  # no trial reads test
  assert [config for config, _ in calls] == ["configs/movielens.py"] * 2
  trials = pd.read_csv(out / "trials.csv")
  for (_, runs), model in zip(calls, ("lr", "wide_deep")):
    assert [r.seed for r in runs] == [0, 1, 2]
    assert sweep.NO_TEST not in runs[0].overrides
    assert f"--config.model.name={model}" in runs[0].overrides
    mine = trials[trials.model == model]
    best = mine.loc[mine.valid_auc_mean.idxmax()]
    assert f"--config.train.learning_rate={best['train.learning_rate']}" in runs[0].overrides
    assert all(os.sep + "report" + os.sep in r.workdir for r in runs)
  assert summary.test_auc_mean.tolist() == pytest.approx([0.61, 0.61])
  assert summary.seeds.tolist() == [3, 3]
  assert "trained anew on `configs/movielens.py`, seeds 0,1,2" in (out / "summary.md").read_text()


def test_the_pruner_stops_a_trial_below_the_median_and_it_counts_as_finished(tmp_path, fake):
  out = tmp_path / "sweep"
  sweep.main(["--config=configs/synthetic.py", "--models=lr", "--seeds=0,1", f"--out={out}",
              "--trials=6", "--prune_startup=1", "--", *SWEEP_TINY])
  trials = pd.read_csv(out / "trials.csv")
  assert len(trials) == 6 and trials.state.isin(["COMPLETE", "PRUNED"]).all()
  pruned = trials[trials.state == "PRUNED"]
  assert len(pruned) >= 1 and pruned.valid_auc_seed0.isna().all()
  best = trials.valid_auc_mean.max()
  pruned_lrs = np.log10(pruned["train.learning_rate"])
  assert (0.8 - 0.05 * abs(pruned_lrs + 2.5) < best).all()  # only worse settings were pruned


def test_a_dead_workers_trial_and_an_interrupted_one_are_retried_with_the_same_parameters(
    tmp_path, monkeypatch, fake):
  out = tmp_path / "sweep"
  entries = sweep.plan(["lr"], "configs/synthetic.py", SWEEP_TINY)
  work = sweep.Sweep(entries, "configs/synthetic.py", [0], str(out),
                     sweep.open_storage("", str(out)), trials=2, echo=lambda line: None)
  state, (study, trial, params) = work.claim(entries[0])
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
  state, (study, retry, retry_params) = work.claim(entries[0])
  assert retry_params == params and retry.user_attrs["retry_of"] == trial.number
  assert study.trials[trial.number].state.name == "FAIL"

  def interrupted(*args, **kwargs):
    raise runner.Interrupted("lr trial 1", 2)

  monkeypatch.setattr(runner, "launch", interrupted)
  with pytest.raises(SystemExit) as stopped:
    work.execute(entries[0], study, retry, retry_params)
  assert stopped.value.code == 130
  monkeypatch.setattr(runner, "launch", fake)
  state, (study, again, again_params) = work.claim(entries[0])
  assert again_params == params and again.user_attrs["retry_of"] == retry.number
  work.execute(entries[0], study, again, again_params)
  work.search()
  done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
  assert len(done) == 2 and len({sweep.params_hash(t.params) for t in done}) == 2


# ----------------------------------------------------------------------------- real processes


def start_sweep(out, *args, models="lr", seeds="0", more=()):
  return subprocess.Popen(
      [sys.executable, "-m", "launch.sweep", "--config=configs/synthetic.py",
       f"--models={models}", f"--seeds={seeds}", f"--out={out}", *args, "--", *SWEEP_TINY,
       *more], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, "timed out"
    time.sleep(0.2)


def main_starts(workdir):
  """How many times `mian_jax.main` was started in a workdir (its log's command lines)."""
  with open(os.path.join(workdir, "log.txt")) as f:
    return sum(line.startswith("# ") and "mian_jax.main" in line for line in f)


@pytest.mark.slow
def test_a_real_sweep_killed_and_rerun_finishes_n_trials_per_model_reusing_finished_runs(
    tmp_path):
  out = tmp_path / "sweep"
  first = start_sweep(out, "--trials=2", models="lr,wide_deep", seeds="0,1")
  wait_for(lambda: len(glob.glob(str(out / "*" / "*" / "seed*" / "eval" / "valid_metrics.json"))))
  first.kill()  # SIGKILL: no handler runs; the child saves on its parent-death SIGTERM
  first.communicate()
  rerun = start_sweep(out, "--trials=2", models="lr,wide_deep", seeds="0,1")
  stdout, stderr = rerun.communicate(timeout=900)
  assert rerun.returncode == 0, stderr[-3000:]
  assert "reused (finished, same config)" in stdout
  assert "is gone; queued again" in stdout  # the killed worker's trial, retried
  summary = pd.read_csv(out / "summary.csv", index_col="model")
  assert {"trials", "valid_auc_mean", "valid_auc_std", "test_auc_mean", "test_auc_std",
          "seeds"} <= set(summary)
  assert summary.trials.to_dict() == {"lr": 2, "wide_deep": 2}
  trials = pd.read_csv(out / "trials.csv")
  done = trials[trials.state.isin(["COMPLETE", "PRUNED"])]
  assert done.groupby("model").size().to_dict() == {"lr": 2, "wide_deep": 2}
  for workdir in glob.glob(str(out / "*" / "*" / "seed*")):
    assert main_starts(workdir) <= 2  # a run interrupted by the kill resumed once
    assert not os.path.exists(os.path.join(workdir, "eval", "test_metrics.json"))
  assert not glob.glob(str(out / "**" / "*.orbax-checkpoint-tmp*"), recursive=True)


@pytest.mark.slow
def test_two_workers_sharing_a_study_end_with_exactly_n_trials_and_train_no_run_twice(tmp_path):
  out = tmp_path / "sweep"
  storage = f"--storage={tmp_path / 'shared.log'}"
  workers = [start_sweep(out, "--trials=3", storage) for _ in range(2)]
  for worker in workers:
    stdout, stderr = worker.communicate(timeout=900)
    assert worker.returncode == 0, stderr[-3000:]
    assert ": training" in stdout  # both took trials
  trials = pd.read_csv(out / "trials.csv")
  assert trials.state.isin(["COMPLETE", "PRUNED"]).sum() == 3
  workdirs = glob.glob(str(out / "lr" / "*" / "seed0"))
  assert len(workdirs) == 3 and all(main_starts(w) == 1 for w in workdirs)
  assert pd.read_csv(out / "summary.csv", index_col="model").loc["lr", "trials"] == 3


def one_line_interrupt(process, signum, workdir_glob):
  """Sends `signum` to a launcher once its child has saved a checkpoint; returns (status,
  stderr, the child's pid)."""
  wait_for(lambda: glob.glob(os.path.join(workdir_glob, "checkpoints", "4")))
  (workdir,) = glob.glob(workdir_glob)
  child = int(open(os.path.join(workdir, ".lock")).read().split()[0])
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr, child, workdir


@pytest.mark.slow
@pytest.mark.parametrize("launcher,signum", [("sweep", signal.SIGINT),
                                             ("ablations", signal.SIGTERM)])
def test_a_signal_to_a_launcher_reaches_its_child_which_saves_and_the_launcher_says_one_line(
    tmp_path, launcher, signum):
  out = tmp_path / "out"
  long_run = ["--config.train.num_train_steps=100000", "--config.train.early_stopping_patience=0"]
  if launcher == "sweep":
    process = start_sweep(out, "--trials=1", more=long_run)
    pattern = str(out / "lr" / "*" / "seed0")
  else:
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.ablations", "--config=configs/synthetic.py",
         "--variants=lr", "--seeds=0", f"--out={out}", "--", *SWEEP_TINY[:-2],
         "--config.train.eval_every_steps=2", *long_run],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pattern = str(out / "lr" / "seed0")
  status, stderr, child, workdir = one_line_interrupt(process, signum, pattern)
  assert status == 128 + signum, stderr[-2000:]
  assert "Traceback" not in stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("interrupted: lr") and "rerun the same command" in lines[-1]
  with pytest.raises(ProcessLookupError):
    os.kill(child, 0)
  assert not glob.glob(os.path.join(workdir, "**", "*orbax-checkpoint-tmp*"), recursive=True)
  with open(os.path.join(workdir, "log.txt")) as f:
    assert f"Received {signal.Signals(signum).name}" in f.read()


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


def test_a_run_without_its_final_test_closes_on_validation():
  from mian_jax import train
  line = train.closing_line("/w", {"valid": {"auc": 0.75, "step": 6, "selected": "best"}})
  assert line.startswith("Done: valid AUC 0.7500 at step 6 (best).")


def test_a_grid_is_searched_point_by_point_as_many_trials_as_points(tmp_path, fake):
  out = tmp_path / "grid"
  summary = sweep.main(["--config=configs/synthetic.py", "--models=lr", "--seeds=0",
                        f"--out={out}", "--grid=train.learning_rate=1e-3,3e-3,1e-2", "--",
                        *SWEEP_TINY])
  trials = pd.read_csv(out / "trials.csv")
  assert sorted(trials["train.learning_rate"]) == [1e-3, 3e-3, 1e-2]
  assert set(trials.origin) == {"grid"} and summary.loc["lr", "train.learning_rate"] == "3e-3"


def test_an_unknown_model_is_one_short_line(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as exit_info:
    sweep.main(["--config=configs/synthetic.py", "--models=nosuchmodel",
                f"--out={tmp_path / 'sweep'}"])
  message = str(exit_info.value.code)
  assert message.startswith("error: unknown models or variants ['nosuchmodel']; models: mian,")
  assert len(message) < 200 and "\n" not in message
