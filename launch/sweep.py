"""Every model searched with the same budget (Optuna), each reported at its best validation
setting; test is read once, for that setting (Table 2).

  python -m launch.sweep --config=configs/amazon_like.py --models=mian,din,dien --trials=20 \\
      --seeds=0,1,2 --out=runs/sweep [--storage=PATH_OR_URL] [--rerun_changed] \\
      [-- --config.train.eval_every_epochs=0.2]
  python -m launch.sweep --config=configs/synthetic.py --space=grid \\
      --grid='train.learning_rate=1e-3,3e-3;model.embed_dim=8,16' --seeds=0,1 --out=runs/grid

Run it from the repository root, like `python -m mian_jax.main`. Each model (or entry of
launch/ablations.py's VARIANTS, `--variants`) is one Optuna study of that name, searching its
space of launch/search_spaces.py with TPE (seeded by --search_seed); its first trial is the
config's defaults, so the search never selects worse than them on validation. `--space=grid`
searches a grid instead (every point once; --trials defaults to the grid size). Every study
gets --trials finished (complete or pruned) trials.

A trial is its parameters x every seed of --seeds: one `python -m mian_jax.main` run per seed
in `<out>/<model>/<hash of the parameters>/seed<k>` (output in `log.txt` there), with
`eval.final_test=False`, so no trial reads the test split. The first seed's validation AUCs are
as it trains; the median pruner stops (SIGTERM: the run saves) a trial below the median of the
earlier trials at the same step. The objective is the mean over seeds of each run's reported
validation AUC (its `eval.report_step`, by default its best validation step).

Resuming: the studies live in --storage (default: the journal file `<out>/optuna_journal.log`),
so rerunning the same command after Ctrl-C or kill -9 goes on: a trial left running by a dead
worker is retried with the same parameters, its finished runs reused and the others resumed
from their checkpoints. Several workers (processes, or machines sharing --out on one file
system) may run the same command with one --storage (a journal file or a database URL such as
sqlite:///runs/sweep.db); they share the studies and end with exactly --trials each.

When every study has its trials, the best trial of each (mean validation AUC) is evaluated on
test once per seed (`python -m mian_jax.evaluate --split=test --step=best`). Outputs in --out:
  trials.csv    every trial: model, number, state, parameters, validation AUC per seed
  summary.csv   per model (index): trials, validation and test AUC mean/std, the chosen
                parameters, the oracle AUC, the difference of mean test AUC to MIAN and its 95%
                Welch interval over seeds
  summary.md    the same as a table, with the budget above it
  summary.png   test AUC per model with error bars
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import os
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import optuna
import pandas as pd
from absl import flags
from optuna.trial import TrialState

from launch import ablations, runner, search_spaces
from mian_jax import cli, writers
from mian_jax.errors import ConfigError
from mian_jax.models import MODELS as MODEL_CLASSES

MODELS = tuple(MODEL_CLASSES)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_S = 30.0  # a worker records that its trial is alive this often
GRACE_S = 300.0  # a running trial silent this long is taken as its worker's death and retried
POLL_S = 2.0  # how often a running child is checked (pruning, heartbeat), and idle workers wait
MAX_FAILURES = 3  # failed trials in a row (runs that exit with an error) that stop a study
MAX_DUPLICATES = 100  # draws of settings already tried before a study is taken as exhausted
NO_TEST = "--config.eval.final_test=False"


class RunFailed(Exception):
  """A trial's run exited with an error (e.g. it diverged); the trial fails, the search goes on."""


class GridSampler(optuna.samplers.GridSampler):
  """Optuna's grid sampler without its `study.stop()` once the grid is covered, which only
  `study.optimize` allows; the sweep counts trials itself."""

  def after_trial(self, study, trial, state, values) -> None:
    del study, trial, state, values


@dataclasses.dataclass(frozen=True)
class Entry:
  """One study: a model or a variant, the flags every trial of it carries and its space."""
  name: str
  overrides: tuple[str, ...]  # the entry's own, the ones after --, and the sweep's fixed ones
  space: dict  # config key -> search_spaces.LogFloat | Choice
  defaults: dict | None  # the config's own parameters, the first trial (None for a grid)

  def setup(self, config: str, seeds: Sequence[int]) -> dict:
    """What a study's trials mean; recorded in the study, so a resume with others stops."""
    return {"config": config, "seeds": list(seeds), "overrides": list(self.overrides),
            "space": {k: d.text() for k, d in self.space.items()}}


def entry_overrides(name: str) -> list[str]:
  """A model runs with its name set explicitly; a variant with its VARIANTS overrides."""
  if name in MODELS:
    return [f"--config.model.name={name}"]
  return list(ablations.VARIANTS[name])


def plan(names: Sequence[str], config: str, extra: Sequence[str], grid: str = "") -> list[Entry]:
  """Every model or variant as an Entry; `grid` ("key=v1,v2;...") replaces the model spaces.
  Raises LaunchError for an unknown name, a key set twice or a bad config."""
  unknown = [n for n in names if n not in MODELS and n not in ablations.VARIANTS]
  if unknown:
    raise runner.LaunchError(f"unknown models or variants {unknown}; models: "
                             f"{', '.join(MODELS)}; variants: see `python -m launch.sweep "
                             "--help`")
  extra_keys = {runner.override_key(flag) for flag in extra}
  if "eval.final_test" in extra_keys:
    raise runner.LaunchError("the search never evaluates test during trials; drop "
                             "--config.eval.final_test")
  try:
    space_grid = search_spaces.parse_grid(grid) if grid else None
  except ConfigError as e:
    raise runner.LaunchError(str(e)) from None
  entries = []
  for name in names:
    own = entry_overrides(name)
    fixed = [NO_TEST] + ([] if "train.early_stopping_patience" in extra_keys else
                         [f"--config.train.early_stopping_patience="
                          f"{search_spaces.EARLY_STOPPING_PATIENCE}"])
    overrides = [*own, *extra, *fixed]
    sources = {f"{name!r}": own, "the overrides after --": extra,
               "--seeds": ["--config.train.seed=0"]}
    if space_grid is not None:
      sources["the grid"] = [f"--config.{key}=0" for key in space_grid]
    runner.check_no_key_twice(sources)
    defaults = cli.flatten(runner.resolve_config(config, overrides))
    if space_grid is not None:
      entries.append(Entry(name, tuple(overrides), space_grid, None))
      continue
    pinned = {runner.override_key(flag) for flag in overrides}
    try:
      space = search_spaces.space_for(defaults["model.name"], defaults, pinned)
    except ConfigError as e:
      raise runner.LaunchError(str(e)) from None
    entries.append(Entry(name, tuple(overrides), space,
                         search_spaces.default_params(space, defaults)))
  return entries


def params_hash(params: dict) -> str:
  """The name of a trial's directory: a short hash of its overrides."""
  return hashlib.sha256("\n".join(search_spaces.overrides(params)).encode()).hexdigest()[:10]


def trial_runs(entry: Entry, params: dict, number: int, seeds: Sequence[int],
               out: str) -> list[runner.Run]:
  """One Run per seed of a trial, in `<out>/<entry>/<params_hash>/seed<k>`."""
  flags = (*entry.overrides, *search_spaces.overrides(params))
  trial_dir = os.path.join(os.path.abspath(out), runner.slug(entry.name), params_hash(params))
  return [runner.Run(f"{entry.name} trial {number}", (), seed,
                     os.path.join(trial_dir, f"seed{seed}"), flags) for seed in seeds]


def open_storage(spec: str, out: str):
  """A database URL (sqlite:///..., postgresql://...) or a journal file path (default:
  `<out>/optuna_journal.log`) as an Optuna storage."""
  if "://" in spec:
    return optuna.storages.RDBStorage(spec)
  path = os.path.abspath(spec or os.path.join(out, "optuna_journal.log"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


@contextlib.contextmanager
def locked(out: str) -> Iterator[None]:
  """An exclusive lock on `<out>/.sweep.lock`: one worker at a time counts and draws trials
  (and writes the summary), so workers sharing --out never overshoot --trials."""
  os.makedirs(out, exist_ok=True)
  fd = os.open(os.path.join(out, ".sweep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def stale_reason(trial: optuna.trial.FrozenTrial, now: float) -> str | None:
  """Why a RUNNING trial's worker is taken as dead (its pid gone on this host, or no heartbeat
  for GRACE_S), or None if it may be alive."""
  worker = trial.user_attrs.get("worker") or {}
  if worker.get("host") == socket.gethostname() and not pid_alive(worker.get("pid", -1)):
    return f"its worker (pid {worker.get('pid')}) is gone"
  beat = trial.user_attrs.get("heartbeat")
  if beat is None and trial.datetime_start is not None:
    beat = trial.datetime_start.timestamp()
  if beat is not None and now - beat > GRACE_S:
    return f"no heartbeat from its worker for {now - beat:.0f} s"
  return None


def read_valid(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval", "valid_metrics.json")) as f:
    return json.load(f)


def valid_curve(workdir: str) -> list[tuple[int, float]]:
  """(step, validation AUC) of every validation in `<workdir>/metrics/metrics.jsonl` so far
  (a line torn by a write in progress is skipped)."""
  path = os.path.join(workdir, "metrics", "metrics.jsonl")
  curve = []
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        auc = row.get("valid/auc")
        if isinstance(auc, float) and math.isfinite(auc):
          curve.append((int(row["step"]), auc))
  return curve


def hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return time.strftime("%H:%M:%S", time.gmtime(max(seconds, 0)))


@dataclasses.dataclass
class Sweep:
  """One worker of a sweep: the studies of `entries` in `storage`, run to `trials` each."""
  entries: list[Entry]
  config: str
  seeds: list[int]
  out: str
  storage: object
  trials: int
  search_seed: int = 0
  prune_startup: int = 5
  prune_warmup: int = 0
  rerun_changed: bool = False
  grid: bool = False
  report_config: str = ""  # "": report the best trial's own runs; else rerun it on this config
  report_seeds: tuple[int, ...] = ()  # seeds of those reruns (default: `seeds`)
  echo: Callable[[str], None] = print
  durations: list[float] = dataclasses.field(default_factory=list)
  failures: dict[str, int] = dataclasses.field(default_factory=dict)

  # --------------------------------------------------------------------------- studies

  def study(self, entry: Entry, num_trials: int = 0) -> optuna.Study:
    """The study of `entry` with a sampler seeded by --search_seed (TPE: and the number of
    trials so far, so workers drawing at other points of a study draw differently; a grid's
    order must be the same in every worker)."""
    sampler = (GridSampler({k: list(d.values) for k, d in entry.space.items()},
                           seed=self.search_seed) if self.grid else
               optuna.samplers.TPESampler(seed=self.search_seed * 100_003 + num_trials))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=self.prune_startup,
                                         n_warmup_steps=self.prune_warmup)
    return optuna.create_study(study_name=entry.name, storage=self.storage, sampler=sampler,
                               pruner=pruner, direction="maximize", load_if_exists=True)

  def check_setup(self, study: optuna.Study, entry: Entry) -> None:
    wanted = entry.setup(self.config, self.seeds)
    recorded = study.user_attrs.get("setup")
    if recorded is None:
      study.set_user_attr("setup", wanted)
    elif recorded != wanted:
      differ = [k for k in wanted if recorded.get(k) != wanted[k]]
      raise runner.LaunchError(
          f"study {entry.name} in the storage was searched with another {', '.join(differ)} "
          f"({recorded.get(differ[0])} -> {wanted[differ[0]]}); use another --out or --storage")

  def reclaim(self, study: optuna.Study, entry: Entry) -> None:
    """Fails every RUNNING trial whose worker is dead and queues its parameters again."""
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
      reason = stale_reason(trial, now)
      if reason is None:
        continue
      try:
        study.tell(trial.number, state=TrialState.FAIL)
      except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        continue  # another worker reclaimed it first
      study.enqueue_trial(trial.params, user_attrs={"origin": "retry", "retry_of": trial.number})
      self.echo(f"{entry.name} trial {trial.number}: {reason}; queued again (its finished runs "
                "are reused, the others resume)")

  def claim(self, entry: Entry):
    """("done" | "busy", None) or ("run", (study, trial, params)): the next trial of `entry`
    for this worker, drawn under the sweep's lock."""
    with locked(self.out):
      study = self.study(entry)
      self.check_setup(study, entry)
      self.reclaim(study, entry)
      trials = study.get_trials(deepcopy=False)
      if not trials and entry.defaults is not None:
        study.enqueue_trial(entry.defaults, user_attrs={"origin": "defaults"})
      done = sum(t.state in DONE for t in trials)
      running = sum(t.state == TrialState.RUNNING for t in trials)
      if done >= self.trials:
        return "done", None
      if done + running >= self.trials:
        return "busy", None
      study = self.study(entry, len(trials))
      for _ in range(MAX_DUPLICATES):
        trial = study.ask()
        params = search_spaces.suggest(trial, entry.space)
        same = [t.number for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and t.state != TrialState.FAIL and t.params == params]
        if not same:
          trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
          trial.set_user_attr("heartbeat", time.time())
          return "run", (study, trial, params)
        trial.set_user_attr("duplicate_of", same[0])
        study.tell(trial, state=TrialState.FAIL)
    raise runner.LaunchError(f"{entry.name}: {MAX_DUPLICATES} draws in a row gave settings "
                             f"already tried; its space has fewer than --trials={self.trials} "
                             "settings")

  # --------------------------------------------------------------------------- trials

  def remaining_runs(self, current_done: int) -> int:
    """Runs still to train if nothing is pruned or reused (for the ETA)."""
    done = 0
    for entry in self.entries:
      trials = self.study(entry).get_trials(deepcopy=False, states=DONE)
      done += min(len(trials), self.trials)
    return max(len(self.entries) * self.trials - done, 0) * len(self.seeds) - current_done

  def train(self, run: runner.Run, should_stop: Callable[[], bool]) -> bool:
    """Trains `run` to its end; False if `should_stop` (asked every POLL_S) stopped it."""
    log_path = os.path.join(run.workdir, "log.txt")
    runner.wait_until_free(run.workdir, self.echo)
    stopped = []

    def stop() -> bool:
      if should_stop():
        stopped.append(True)
      return bool(stopped)

    code = runner.launch(runner.build_command(self.config, run.workdir, run.seed, run.overrides),
                         log_path, run.label, stop, POLL_S)
    if stopped:
      return False
    if code or not runner.is_finished(run.workdir, "valid"):
      with open(log_path) as f:
        errors = [line.strip() for line in f if line.startswith("error:")]
      raise RunFailed(f"{run.label} exited with status {code}"
                      + (f" ({errors[-1]})" if errors else "") + f"; its log is {log_path}")
    return True

  def run_trial(self, entry: Entry, trial: optuna.Trial, params: dict) -> list[dict]:
    """Trains (or reuses) every seed of a trial; returns their valid metrics. Raises
    TrialPruned when the pruner stops it, RunFailed when a run fails."""
    runs = trial_runs(entry, params, trial.number, self.seeds, self.out)
    configs = [runner.resolve_config(self.config, run.flags()) for run in runs]
    runner.check_workdirs(runs, configs, self.rerun_changed, self.echo)
    reported, beat = set(), [time.time()]

    def report(workdir: str, prune: bool = True) -> bool:
      """Beats the heartbeat; reports seed 0's new validation AUCs (`prune`); returns whether
      the pruner stops the trial."""
      if time.time() - beat[0] > HEARTBEAT_S:
        trial.set_user_attr("heartbeat", time.time())
        beat[0] = time.time()
      if not prune:
        return False
      for step, auc in valid_curve(workdir):
        if step not in reported:
          trial.report(auc, step)
          reported.add(step)
      return bool(reported) and trial.should_prune()

    metrics = []
    for k, run in enumerate(runs):
      head = run.label
      trial.set_user_attr("heartbeat", time.time())
      if runner.is_finished(run.workdir, "valid"):
        self.echo(f"{head}: reused (finished, same config)")
      else:
        self.echo(f"{head}: training, log in {os.path.join(run.workdir, 'log.txt')}")
        start = time.time()
        finished = self.train(run, lambda w=run.workdir, first=k == 0: report(w, first))
        self.durations.append(time.time() - start)
        eta = np.mean(self.durations) * self.remaining_runs(k + 1)
        if not finished:
          step, auc = max(valid_curve(run.workdir))
          self.echo(f"{head}: pruned at step {step} (valid AUC {auc:.4f}) after "
                    f"{hms(self.durations[-1])} | ETA {hms(eta)}")
          raise optuna.TrialPruned()
        valid = read_valid(run.workdir)
        self.echo(f"{head}: done in {hms(self.durations[-1])}, valid AUC {valid['auc']:.4f} "
                  f"at step {valid['step']} | ETA {hms(eta)}")
      metrics.append(read_valid(run.workdir))
      if k == 0 and report(run.workdir) and len(runs) > 1:
        self.echo(f"{head}: pruned after seed {run.seed} (below the median)")
        raise optuna.TrialPruned()
    return metrics

  def execute(self, entry: Entry, study: optuna.Study, trial: optuna.Trial,
              params: dict) -> None:
    """Runs a claimed trial and tells the study its outcome. An interruption fails it and
    queues its parameters again, so the rerun resumes it first."""
    try:
      metrics = self.run_trial(entry, trial, params)
    except optuna.TrialPruned:
      self.tell(study, trial, state=TrialState.PRUNED)
      return
    except RunFailed as e:
      self.echo(f"{entry.name} trial {trial.number} failed: {e}")
      trial.set_user_attr("error", str(e))
      self.tell(study, trial, state=TrialState.FAIL)
      self.failures[entry.name] = self.failures.get(entry.name, 0) + 1
      if self.failures[entry.name] >= MAX_FAILURES:
        raise runner.LaunchError(f"{entry.name}: {MAX_FAILURES} trials in a row failed; the "
                                 f"last: {e}") from None
      return
    except BaseException:
      if self.tell(study, trial, state=TrialState.FAIL):
        study.enqueue_trial(params, user_attrs={"origin": "retry", "retry_of": trial.number})
      raise
    self.failures[entry.name] = 0
    aucs = [m["auc"] for m in metrics]
    trial.set_user_attr("valid_auc", aucs)
    trial.set_user_attr("valid_step", [m["step"] for m in metrics])
    self.tell(study, trial, values=float(np.mean(aucs)))

  def tell(self, study: optuna.Study, trial: optuna.Trial, **kwargs) -> bool:
    """study.tell, unless another worker took the trial as dead and failed it meanwhile."""
    try:
      study.tell(trial, **kwargs)
      return True
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
      self.echo(f"trial {trial.number} was retried by another worker; its runs are reused there")
      return False

  def search(self) -> None:
    """Runs trials, one study after the other in turn, until every study has --trials; waits
    while other workers finish the last ones."""
    waiting = False
    while True:
      states = []
      for entry in self.entries:
        state, claimed = self.claim(entry)
        states.append(state)
        if claimed is not None:
          waiting = False
          self.execute(entry, *claimed)
      if all(state == "done" for state in states):
        return
      if "run" not in states:
        if not waiting:
          self.echo("waiting for the trials other workers are running")
          waiting = True
        time.sleep(POLL_S)

  # --------------------------------------------------------------------------- report

  def test_metrics(self, run: runner.Run, valid: dict) -> dict:
    """Test metrics of the step a run reported on validation: `mian_jax.evaluate` once per
    run (`eval/test_metrics_step<N>.json`, reused when present)."""
    path = os.path.join(run.workdir, "eval", f"test_metrics_step{valid['step']}.json")
    if not os.path.isfile(path):
      step = "best" if valid.get("selected") == "best" else "latest"
      command = [sys.executable, "-m", "mian_jax.evaluate", f"--workdir={run.workdir}",
                 "--split=test", f"--step={step}"]
      runner.wait_until_free(run.workdir, self.echo)
      code = runner.launch(command, os.path.join(run.workdir, "log.txt"), run.label)
      if code or not os.path.isfile(path):
        raise runner.LaunchError(f"evaluating {run.workdir} on test failed (status {code}); "
                                 f"see {os.path.join(run.workdir, 'log.txt')}")
      self.echo(f"{run.label}: test evaluated at step {valid['step']}")
    with open(path) as f:
      return json.load(f)

  def report_runs(self, entry: Entry, best: optuna.trial.FrozenTrial) -> list[dict]:
    """The best trial's setting trained anew on --report_config, once per seed, each run
    evaluating its reported step on test at its end (the only read of test). Runs live in
    `<out>/report/<entry>/<params_hash>/seed<k>` and are reused when finished."""
    flags = tuple(f for f in entry.overrides if f != NO_TEST) + tuple(
        search_spaces.overrides(best.params))
    trial_dir = os.path.join(os.path.abspath(self.out), "report", runner.slug(entry.name),
                             params_hash(best.params))
    runs = [runner.Run(f"{entry.name} report", (), seed, os.path.join(trial_dir, f"seed{seed}"),
                       flags) for seed in (self.report_seeds or self.seeds)]
    rows = runner.run_all(runs, self.report_config, self.rerun_changed, self.echo)
    return [{"seed": r["seed"], "valid_auc": r["valid_auc"], "test_auc": r["test_auc"],
             "test_logloss": r["test_logloss"], "test_gauc": r["test_gauc"],
             "oracle_auc": r["oracle_auc"], "step": r["step"]} for r in rows]

  def collect(self) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, per-run results of each study's best trial, with test metrics)."""
    trial_rows, run_rows = [], []
    for entry in self.entries:
      trials = self.study(entry).get_trials(deepcopy=False)
      for t in trials:
        aucs = t.user_attrs.get("valid_auc", [])
        trial_rows.append({
            "model": entry.name, "number": t.number, "state": t.state.name,
            "origin": t.user_attrs.get("origin", "grid" if self.grid else "tpe"),
            "valid_auc_mean": t.value if t.state == TrialState.COMPLETE else np.nan,
            "valid_auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else np.nan,
            **{f"valid_auc_seed{s}": a for s, a in zip(self.seeds, aucs)},
            "directory": params_hash(t.params), **t.params})
      complete = [t for t in trials if t.state == TrialState.COMPLETE]
      if not complete:
        continue
      best = max(complete, key=lambda t: (t.value, -t.number))
      if self.report_config:
        run_rows += [{"model": entry.name, "trial": best.number, **row,
                      "trials": sum(t.state in DONE for t in trials), **best.params}
                     for row in self.report_runs(entry, best)]
        continue
      for run in trial_runs(entry, best.params, best.number, self.seeds, self.out):
        valid = read_valid(run.workdir)
        test = self.test_metrics(run, valid)
        run_rows.append({
            "model": entry.name, "trial": best.number, "seed": run.seed,
            "trials": sum(t.state in DONE for t in trials), "valid_auc": valid["auc"],
            "test_auc": test["auc"], "test_logloss": test["logloss"],
            "test_gauc": test.get("gauc", np.nan), "oracle_auc": test.get("oracle_auc", np.nan),
            "step": valid["step"], **best.params})
    return pd.DataFrame(trial_rows), pd.DataFrame(run_rows)


# ----------------------------------------------------------------------------- summary


def welch_interval(a: Sequence[float], b: Sequence[float],
                   level: float = 0.95) -> tuple[float, float]:
  """The `level` Welch t-interval of mean(a) - mean(b); NaN with fewer than 2 values in one."""
  from scipy import stats  # noqa: PLC0415 - only the summary needs it

  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2 or len(b) < 2:
    return math.nan, math.nan
  diff = a.mean() - b.mean()
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  se = math.sqrt(va + vb)
  if se == 0:
    return diff, diff
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = stats.t.ppf(0.5 + level / 2, df) * se
  return diff - half, diff + half


def summarise(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
  """Per model (index, in the order run): its best trial's validation and test AUC over seeds,
  its parameters (`keys`), and the difference of mean test AUC to MIAN (to the first model
  without MIAN) with its 95% Welch interval."""
  order = list(dict.fromkeys(runs.model))
  grouped = runs.groupby("model", sort=False)
  summary = grouped.agg(
      trials=("trials", "first"), best_trial=("trial", "first"),
      valid_auc_mean=("valid_auc", "mean"), valid_auc_std=("valid_auc", "std"),
      test_auc_mean=("test_auc", "mean"), test_auc_std=("test_auc", "std"),
      test_logloss_mean=("test_logloss", "mean"), test_gauc_mean=("test_gauc", "mean"),
      oracle_auc=("oracle_auc", "mean"), seeds=("seed", "count")).loc[order]
  for key in keys:
    summary[key] = grouped[key].first() if key in runs else np.nan
  reference = "mian" if "mian" in summary.index else order[0]
  ref_auc = runs[runs.model == reference].test_auc
  summary["delta_test_auc"] = summary.test_auc_mean - summary.loc[reference, "test_auc_mean"]
  for model in order:
    low, high = welch_interval(runs[runs.model == model].test_auc, ref_auc)
    summary.loc[model, "delta_ci_low"], summary.loc[model, "delta_ci_high"] = low, high
  summary.attrs["reference"] = reference
  return summary


def summary_markdown(summary: pd.DataFrame, budget: str, title: str) -> str:
  reference = summary.attrs["reference"]
  rows = []
  for model, r in summary.iterrows():
    ci = ("" if model == reference or not math.isfinite(r.delta_ci_low) else
          f" [{r.delta_ci_low:+.4f}, {r.delta_ci_high:+.4f}]")
    rows.append([model, int(r.trials), runner.mean_std(r.valid_auc_mean, r.valid_auc_std),
                 runner.mean_std(r.test_auc_mean, r.test_auc_std),
                 "" if model == reference else f"{r.delta_test_auc:+.4f}{ci}",
                 r.test_logloss_mean, r.test_gauc_mean, r.oracle_auc, int(r.seeds)])
  table = runner.markdown_table(
      ["model", "trials", "valid AUC", "test AUC (mean ± std)",
       f"Δ test AUC vs {reference} [95% CI]", "test logloss", "test gAUC", "oracle AUC",
       "seeds"], rows, [False] + [True] * 8)
  return (f"# {title}\n\n{budget}\n\n{table}\nEach model at its trial with the highest mean "
          "validation AUC over seeds (trials.csv); test was read once, for that trial. The "
          "interval is Welch's t over seeds. Chosen parameters: summary.csv.\n")


def budget_line(sweep: Sweep, args: types.SimpleNamespace) -> str:
  search = (f"a grid of {args.trials} points (`{args.grid}`)" if sweep.grid else
            f"TPE (seed {sweep.search_seed}), the first trial the config's defaults")
  extra = " ".join(args.overrides) or "none"
  return (f"Budget: {sweep.trials} finished trials per model, {search}; each trial "
          f"{runner.plural(len(sweep.seeds), 'seed')} ({args.seeds}); pruner: median of "
          f"seed {sweep.seeds[0]}'s validation AUC after {sweep.prune_startup} trials "
          f"(warm-up {sweep.prune_warmup} steps), stopping after "
          f"{search_spaces.EARLY_STOPPING_PATIENCE} validations without a better AUC; data: "
          f"`{args.config}`, overrides: `{extra}`." + (
              f" Reported: each model's best setting trained anew on `{sweep.report_config}`, "
              f"seeds {','.join(map(str, sweep.report_seeds or sweep.seeds))}, test read once at "
              "the end of each run." if sweep.report_config else ""))


def write_outputs(runs: pd.DataFrame, keys: Sequence[str], out: str, budget: str,
                  title: str) -> pd.DataFrame:
  """Writes summary.csv, summary.md and summary.png; returns the summary."""
  summary = summarise(runs, keys)
  summary.to_csv(os.path.join(out, "summary.csv"))
  writers.write_text_atomic(os.path.join(out, "summary.md"),
                            summary_markdown(summary, budget, title))
  runner.plot_summary(summary, list(summary.index), summary.test_auc_mean,
                      summary.test_auc_std, os.path.join(out, "summary.png"), title,
                      "test AUC at the best trial")
  return summary


# ----------------------------------------------------------------------------- the command


def define_flags(fv: flags.FlagValues) -> None:
  runner.define_launch_flags(fv, out="runs/sweep")
  string = functools.partial(flags.DEFINE_string, flag_values=fv)
  integer = functools.partial(flags.DEFINE_integer, flag_values=fv)
  string("models", ",".join(MODELS), "comma-separated models (default: all eight)")
  string("variants", "", "comma-separated extra entries of ablations.VARIANTS: "
         f"{', '.join(ablations.VARIANTS)}")
  integer("trials", 0, "finished trials per model (default: 20; with --space=grid, its size)")
  flags.DEFINE_enum("space", "", ["", "default", "grid"],
                    "default: launch/search_spaces.py; grid: --grid, every point once (what "
                    "--grid alone means)", flag_values=fv)
  string("grid", "", "'key=v1,v2;key2=w1,w2' for --space=grid")
  string("storage", "", "journal file or database URL of the studies (default: "
         "<out>/optuna_journal.log); share it to run several workers")
  string("report_config", "", "search on --config (e.g. a subsample of users), then train each "
         "model's best setting on this config, once per seed, and report those runs (default: "
         "report the best trial's own runs)")
  string("report_seeds", "", "seeds of the --report_config runs (default: --seeds)")
  integer("search_seed", 0, "seed of the TPE sampler")
  integer("prune_startup", 5, "trials of a study finished before the pruner stops any")
  integer("prune_warmup", 0, "training steps before a trial can be pruned")


def entry_names(models: str, variants: str) -> list[str]:
  """The studies to run: --models, then --variants (ablations.parse_variants), once each."""
  names = [n.strip() for n in models.split(",") if n.strip()]
  return list(dict.fromkeys(names + (ablations.parse_variants(variants) if variants else [])))


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
  args = runner.parse_flags(argv, __doc__, define_flags, rest="overrides")
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  seeds = [int(s) for s in args.seeds.split(",")]
  grid = args.space == "grid" or (not args.space and bool(args.grid))
  try:
    for flag in args.overrides:
      runner.override_key(flag)
    if args.grid and not grid:
      raise runner.LaunchError("--grid searches a grid; drop --space=default")
    entries = plan(entry_names(args.models, args.variants), args.config, args.overrides,
                   args.grid if grid else "")
    if grid:
      size = search_spaces.grid_size(entries[0].space)
      args.trials = args.trials or size
      if args.trials > size:
        raise runner.LaunchError(f"--trials={args.trials} exceeds the grid's {size} points")
    args.trials = args.trials or 20
    os.makedirs(args.out, exist_ok=True)
    sweep = Sweep(entries, args.config, seeds, args.out, open_storage(args.storage, args.out),
                  args.trials, args.search_seed, args.prune_startup, args.prune_warmup,
                  args.rerun_changed, grid, args.report_config,
                  tuple(int(s) for s in args.report_seeds.split(",") if s.strip()))
    for entry in entries:
      print(f"{entry.name}: {len(entry.space)} dimensions ({', '.join(entry.space)}), "
            f"{args.trials} trials x {runner.plural(len(seeds), 'seed')}")
    sweep.search()
    with locked(args.out):  # one worker evaluates test; another then reuses its files
      trials, runs = sweep.collect()
    trials.to_csv(os.path.join(args.out, "trials.csv"), index=False)
    if runs.empty:
      raise runner.LaunchError(f"no trial completed; see {args.out}/trials.csv")
  except runner.LaunchError as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:  # between two runs: nothing was training
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    sys.exit(130)
  keys = list(dict.fromkeys(k for entry in entries for k in entry.space))
  title = (f"Test AUC at each model's best validation trial: "
           f"{args.report_config or args.config}")
  summary = write_outputs(runs, keys, args.out, budget_line(sweep, args), title)
  print(runner.markdown_table(
      ["model", "trials", "valid AUC", "test AUC"],
      [[m, int(r.trials), runner.mean_std(r.valid_auc_mean, r.valid_auc_std),
        runner.mean_std(r.test_auc_mean, r.test_auc_std)] for m, r in summary.iterrows()]))
  return summary


if __name__ == "__main__":
  main()
