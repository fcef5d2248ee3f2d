"""What the launch tools (sweep, ablations, table4, ...) share: runs, their reuse, their logs,
and tables.

A run is one `python -m mian_jax.main --config=<file> --workdir=<dir> <overrides>` in its own
workdir. Before anything trains, every run's config is resolved here exactly as main resolves it
(the config file plus the overrides, locked). A run whose workdir already holds a `config.json`
is reused (finished) or resumed (unfinished) only when that recorded config equals the requested
one; otherwise the tool stops with one line naming the keys that differ, or, when asked, moves
the old workdir aside and runs again. Each run's output goes to `<workdir>/log.txt`.

Ctrl-C (SIGINT) or SIGTERM to a launch tool reaches its running child once; the tool waits
for the child's checkpoint save, prints one line and exits with status 128 + the signal, and
the same command resumes. A launcher killed outright (SIGKILL) takes its child down with a
SIGTERM, so the child saves too (Linux).

The results of a run are its `eval/valid_metrics.json` and `eval/test_metrics.json`: metrics of
the parameters `eval.report_step` selects (by default the run's best validation step), so a
test number is never chosen on test.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import flags

from benchmarks.common import parse_flags, usage_error  # noqa: F401  (every tool's flags)
from mian_jax.writers import hms, markdown_table  # noqa: F401  (the launchers' tables)
from mian_jax import workdir as workdir_lib
from mian_jax.errors import first_of


class LaunchError(Exception):
  """A problem the user fixes (a changed config, a failed run); printed as one line."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a model or variant (`name`), a grid point, a seed and its workdir."""
  name: str
  point: tuple[tuple[str, str], ...]  # ((config key, value as typed), ...); () without a grid
  seed: int
  workdir: str
  overrides: tuple[str, ...]  # every --config.* flag except the seed

  @property
  def label(self) -> str:
    return " ".join([self.name, *(f"{k}={v}" for k, v in self.point), f"seed {self.seed}"])

  def flags(self) -> list[str]:
    """The config flags of this run, as main receives them."""
    return [f"--config.train.seed={self.seed}", *self.overrides]


def define_launch_flags(fv: flags.FlagValues, out: str) -> None:
  """The flags every launch tool shares: --config, --seeds, --out (default `out`),
  --rerun_changed; --config.* overrides for every run go after a `--`."""
  flags.DEFINE_string("config", "configs/synthetic.py", "the config file of every run",
                      flag_values=fv)
  flags.DEFINE_string("seeds", "0,1,2", "comma-separated training seeds", flag_values=fv)
  flags.DEFINE_string("out", out, "where the runs and the outputs go", flag_values=fv)
  flags.DEFINE_bool("rerun_changed", False,
                    "move a workdir whose recorded config differs aside and rerun it",
                    flag_values=fv)


def slug(text: str) -> str:
  """A directory name for a variant or a grid point (as launch/ablations.py always named them)."""
  return text.replace("/", "_").replace(" ", "_")


def build_command(config: str, workdir: str, seed: int, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "mian_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.train.seed={seed}", *overrides]


def override_key(flag: str) -> str:
  """"--config.train.learning_rate=1e-3" -> "train.learning_rate"."""
  if not flag.startswith("--config.") or "=" not in flag:
    raise LaunchError(f"{flag!r} is not a config override (--config.<key>=<value>)")
  return flag[len("--config."):].split("=", 1)[0]


def check_no_key_twice(sources: dict[str, Sequence[str]]) -> None:
  """Raises if two sources of overrides (e.g. the grid and the extra flags) set one key."""
  owner = {}
  for source, overrides in sources.items():
    for flag in overrides:
      key = override_key(flag)
      if key in owner and owner[key] != source:
        raise LaunchError(f"config key {key} is set by both {owner[key]} and {source}")
      owner[key] = source


def resolve_config(config_file: str, overrides: Sequence[str]) -> dict:
  """The config `python -m mian_jax.main` builds from these flags (`workdir.load_config`), as
  JSON-like data (the form of the `config.json` it writes). LaunchError for a bad key, value or
  config file."""
  try:
    config = workdir_lib.load_config(config_file, overrides)
  except ValueError as e:
    raise LaunchError(f"{config_file} {' '.join(overrides)}: {e}") from None
  return json.loads(json.dumps(config.to_dict()))


def is_finished(workdir: str, split: str = "test") -> bool:
  """Whether the run in `workdir` reported: its `eval/<split>_metrics.json` exists (a run
  with `eval.final_test=False` reports valid only)."""
  return os.path.isfile(os.path.join(workdir, "eval", f"{split}_metrics.json"))


def check_workdirs(runs: Sequence[Run], configs: Sequence[dict], rerun_changed: bool,
                   echo: Callable[[str], None] = print) -> None:
  """Stops (LaunchError, one line) on the first workdir whose recorded config is not the
  requested one, or with `rerun_changed` moves every such workdir aside."""
  for run, requested in zip(runs, configs):
    recorded = workdir_lib.read_recorded_config(run.workdir)
    if recorded is not None:
      differences = workdir_lib.config_differences(recorded, requested)
    elif is_finished(run.workdir):
      differences = ["config.json missing"]
    else:
      continue
    if not differences:
      continue
    if rerun_changed:
      aside = f"{run.workdir}.changed-{time.strftime('%Y%m%d-%H%M%S')}"
      os.rename(run.workdir, aside)
      echo(f"{run.label}: config changed ({'; '.join(differences)}); moved to {aside}")
      continue
    shown = first_of(differences, 4)
    raise LaunchError(f"{run.workdir} was run with another config ({shown}); pass "
                      "--rerun_changed to move it aside and run again, or use another --out")


class Interrupted(SystemExit):
  """SIGINT or SIGTERM reached a launcher while a child trained; the child saved and stopped.
  A SystemExit with status 128 + the signal, so a launcher that does not catch it exits with
  that status and no traceback (its one line is already printed)."""

  def __init__(self, label: str, signum: int):
    super().__init__(128 + signum)
    self.label, self.signum = label, signum


# prctl(PR_SET_PDEATHSIG) from libc (Linux); None elsewhere. Looked up here, not in the child.
try:
  _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
  _PRCTL = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
  """The child's pre-exec hook: SIGTERM when the launcher dies, even by SIGKILL, so a killed
  launcher leaves no orphan training on (the child saves and exits as on preemption)."""

  def hook():
    if _PRCTL is not None:
      _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
      if os.getppid() != parent:  # the launcher died before the hook ran
        os.kill(os.getpid(), signal.SIGTERM)

  return hook


def wait_until_free(workdir: str, echo: Callable[[str], None] = print,
                    timeout_s: float = 600.0) -> None:
  """Waits until no process holds `workdir`'s run lock (mian_jax.workdir.hold), e.g. the child
  of a killed launcher still saving its checkpoint. Raises LaunchError after `timeout_s`."""
  path = workdir_lib.lock_path(workdir)
  if not os.path.isfile(path):
    return
  deadline, said = time.monotonic() + timeout_s, False
  fd = os.open(path, os.O_RDONLY)
  try:
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
      except OSError:
        if time.monotonic() > deadline:
          raise LaunchError(f"{workdir} is still in use after {timeout_s:.0f} s "
                            f"({os.pread(fd, 200, 0).decode(errors='replace').strip()})") from None
        if not said:
          echo(f"waiting for the run holding {workdir} to stop")
          said = True
        time.sleep(0.5)
  finally:
    os.close(fd)


def launch(command: Sequence[str], log_path: str, label: str = "",
           should_stop: Callable[[], bool] | None = None, poll_s: float = 2.0) -> int:
  """Runs `command`, appending its stdout and stderr to `log_path`; returns the exit code.

  SIGINT and SIGTERM sent to the launcher go to the child once (it runs in its own session, so
  a terminal's Ctrl-C does not reach it twice), the launcher waits for the child's checkpoint
  save, prints one line and raises Interrupted. Every `poll_s` seconds `should_stop()` (if
  given) is asked; True sends the child SIGTERM, and its exit code is returned.
  """
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  received, child = [], None

  def forward(signum, frame):
    del frame
    if not received and child is not None and child.poll() is None:
      child.send_signal(signum)
    received.append(signum)

  with open(log_path, "a") as log:
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
    log.flush()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
      if received:  # a signal came while the child was starting
        child.send_signal(received[0])
      stop_sent = False
      while True:
        try:
          code = child.wait(timeout=poll_s)
          break
        except subprocess.TimeoutExpired:
          if should_stop is not None and not stop_sent and not received and should_stop():
            child.send_signal(signal.SIGTERM)
            stop_sent = True
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
  if received:
    print(f"interrupted: {label or log_path} saved at its last step; rerun the same command "
          "to resume", file=sys.stderr)
    raise Interrupted(label, received[0])
  return code


def read_result(run: Run) -> dict:
  """The reported metrics of a finished run, as one results.csv row (without name and point)."""
  metrics = {}
  for split in ("valid", "test"):
    with open(os.path.join(run.workdir, "eval", f"{split}_metrics.json")) as f:
      metrics[split] = json.load(f)
  valid, test = metrics["valid"], metrics["test"]
  return {"seed": run.seed, "valid_auc": valid["auc"], "test_auc": test["auc"],
          "test_logloss": test["logloss"], "test_gauc": test.get("gauc", np.nan),
          "best_step": test.get("best_step", np.nan), "step": test["step"],
          "oracle_auc": test.get("oracle_auc", np.nan)}


def run_all(runs: Sequence[Run], config_file: str, rerun_changed: bool = False,
            echo: Callable[[str], None] = print) -> list[dict]:
  """Resolves and checks every run, trains those not finished, returns their results in order.

  Progress: one line per run ("run k/n ... reused" or "... done in T | ETA"), where the ETA is
  the mean time of the runs trained so far times the number still to train.
  """
  configs = [resolve_config(config_file, run.flags()) for run in runs]
  check_workdirs(runs, configs, rerun_changed, echo)
  to_train = sum(not is_finished(run.workdir) for run in runs)
  durations, rows = [], []
  for k, run in enumerate(runs, 1):
    head = f"run {k}/{len(runs)} {run.label}"
    if is_finished(run.workdir):
      result = read_result(run)
      echo(f"{head}: reused (finished, same config)")
    else:
      log_path = os.path.join(run.workdir, "log.txt")
      echo(f"{head}: training, log in {log_path}")
      start = time.time()
      wait_until_free(run.workdir, echo)
      code = launch(build_command(config_file, run.workdir, run.seed, run.overrides), log_path,
                    run.label)
      if code or not is_finished(run.workdir):
        with open(log_path) as f:
          tail = f.readlines()[-15:]
        echo("".join(tail).rstrip())
        raise LaunchError(f"{run.label} failed (exit code {code}); its log is {log_path}")
      durations.append(time.time() - start)
      eta = np.mean(durations) * (to_train - len(durations))
      result = read_result(run)
      echo(f"{head}: done in {hms(durations[-1])}, valid AUC {result['valid_auc']:.4f} at "
           f"step {result['step']} | ETA {hms(eta)}")
    rows.append({"name": run.name, **dict(run.point), **result})
  return rows


# ----------------------------------------------------------------------------- reporting


def plural(count: int, noun: str) -> str:
  return f"{count} {noun}" + ("" if count == 1 else "s")


def mean_std(mean: float, std: float) -> str:
  """"0.7123 ± 0.0040" ("0.7123" with one seed, "" without a value)."""
  if mean is None or not math.isfinite(mean):
    return ""
  return f"{mean:.4f}" if std is None or not math.isfinite(std) else f"{mean:.4f} ± {std:.4f}"


def plot_summary(summary, labels: Sequence[str], means, stds, path: str, title: str,
                 what: str) -> None:
  """`plot_bars` of a summary table with columns `seeds` and `oracle_auc` (its first oracle)."""
  oracle = summary.oracle_auc.dropna()
  plot_bars(labels, means, stds, path, title,
            f"{what} (mean ± std over {plural(int(summary.seeds.max()), 'seed')})",
            oracle=float(oracle.iloc[0]) if len(oracle) else None)


def plot_bars(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], path: str,
              title: str, xlabel: str, oracle: float | None = None) -> None:
  """Horizontal bars (first label on top) with error bars and value labels, the x-axis zoomed
  to the differences. The oracle is a labelled line when it fits without squashing the bars
  (within one more spread of them), else a note."""
  import matplotlib  # noqa: PLC0415 - only the plots need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  means = np.asarray(means, float)
  stds = np.nan_to_num(np.asarray(stds, float))
  low, high = float(np.min(means - stds)), float(np.max(means + stds))
  spread = max(high - low, 0.002)
  left, right = low - 0.3 * spread, high + 0.6 * spread  # room for the value labels
  y = np.arange(len(means))[::-1]
  fig, ax = plt.subplots(figsize=(8, 0.55 * len(means) + 1.6))
  ax.barh(y, means, xerr=stds, color="tab:blue", alpha=0.8, capsize=3, height=0.6)
  for yi, mean, std in zip(y, means, stds):
    ax.text(mean + std + 0.02 * spread, yi, mean_std(mean, std if std else None),
            va="center", fontsize=8)
  has_oracle = oracle is not None and math.isfinite(oracle)
  if has_oracle and oracle <= high + spread:
    right = max(right, oracle + 0.15 * spread)
    ax.axvline(oracle, color="black", ls="--", lw=1, label=f"oracle AUC {oracle:.4f}")
    ax.legend(loc="lower right", fontsize=8)
  elif has_oracle:
    ax.text(0.99, 0.01, f"oracle AUC {oracle:.4f} (off the axis)", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=8)
  ax.set_xlim(left, right)
  ax.set_yticks(y, labels)
  ax.set_xlabel(xlabel)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
