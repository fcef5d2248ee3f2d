"""Figure 5 of the paper: training loss and validation AUC of Table 4's variants over training.

  python -m launch.figure5 --runs=runs/table4 [--loss_key=train/loss] [--smooth_window=5]

--runs is the --out directory of launch/table4.py (or of launch/ablations.py with those
variants): `<runs>/<variant>/seed<k>/metrics/metrics.jsonl` as training writes it. Nothing is
trained; a variant without runs is left out, and unfinished runs are drawn as far as they got.
A step logged twice (a run resumed from an earlier checkpoint) keeps its last value.

Writes `<runs>/figure5.png`: the training loss (each seed's logged window means smoothed by a
centred moving mean, the mean over seeds as a line and their min-max as a band)
and the validation AUC (mean ± std over seeds at each validation step), each axis zoomed to the
later part of training where the variants differ; and `<runs>/figure5.md`: per variant, the best
validation AUC of the seed mean and its step, and each seed's best validation AUC and step.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
from absl import flags

from launch import runner, table4
from mian_jax import writers

COLORS = {"mian": "black", "post-LN Transformer": "tab:blue", "no Transformer": "tab:orange"}
VALID_KEY = "valid/auc"


def seed_dirs(runs: str, name: str) -> dict[int, str]:
  """seed -> workdir of the runs of variant `name` that have logged metrics (not the
  `seed<k>.changed-*` directories that --rerun_changed moved aside)."""
  variant_dir = os.path.join(runs, runner.slug(name))
  found = {}
  for entry in sorted(os.listdir(variant_dir)) if os.path.isdir(variant_dir) else []:
    match = re.fullmatch(r"seed(\d+)", entry)
    path = os.path.join(variant_dir, entry)
    if match and os.path.isfile(os.path.join(path, "metrics", "metrics.jsonl")):
      found[int(match.group(1))] = path
  return found


def read_series(workdir: str, key: str) -> pd.Series:
  """The logged values of `key` by step (the last record of a step wins)."""
  values = {}
  for record in writers.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl")):
    if key in record:
      values[int(record["step"])] = float(record[key])
  return pd.Series(values, dtype=float).sort_index()


def smooth(series: pd.Series, window: int) -> pd.Series:
  """Centred moving mean over `window` logged values (fewer at the ends): unlike an exponential
  average it does not shift a curve to later steps, which would blur convergence speed. A step
  a run did not log stays missing."""
  smoothed = series.rolling(window, center=True, min_periods=1).mean()
  return smoothed.where(series.notna())


def curves(runs: str, key: str) -> dict[str, pd.DataFrame]:
  """variant -> DataFrame (index step, one column per seed) of `key`, for the variants with
  runs, in Table 4's order."""
  result = {}
  for name, _, _ in table4.VARIANTS:
    seeds = seed_dirs(runs, name)
    columns = {seed: read_series(path, key) for seed, path in seeds.items()}
    columns = {seed: series for seed, series in columns.items() if len(series)}
    if columns:
      result[name] = pd.DataFrame(columns).sort_index()
  return result


def best_validation(valid: dict[str, pd.DataFrame]) -> pd.DataFrame:
  """Per variant: the best validation AUC of the seed mean and its step, each seed's best
  validation AUC (mean ± std) and the step where each seed reached it."""
  rows = {}
  for name, frame in valid.items():
    mean = frame.mean(axis=1)
    per_seed = frame.max()
    rows[name] = {"mean_best_auc": mean.max(), "mean_best_step": int(mean.idxmax()),
                  "seed_best_auc_mean": per_seed.mean(), "seed_best_auc_std": per_seed.std(),
                  "seed_best_steps": ", ".join(str(int(s)) for s in frame.idxmax()),
                  "seeds": frame.shape[1], "last_step": int(frame.index.max())}
  return pd.DataFrame.from_dict(rows, orient="index")


def best_markdown(best: pd.DataFrame) -> str:
  rows = [[table4.LABELS[name], r.mean_best_auc, r.mean_best_step,
           runner.mean_std(r.seed_best_auc_mean, r.seed_best_auc_std), r.seed_best_steps,
           r.last_step, int(r.seeds)] for name, r in best.iterrows()]
  return runner.markdown_table(
      ["variant", "best valid AUC (seed mean)", "at step", "best valid AUC per seed",
       "its step per seed", "last validated step", "seeds"], rows, [False] + [True] * 6)


def zoomed_limits(lows: np.ndarray, highs: np.ndarray, steps: np.ndarray,
                  room: float = 1.5) -> tuple[float, float, int]:
  """y-limits that show the differences: the range of the points in the second half of
  training, widened to every earlier point within `room` times that range. Returns (bottom,
  top, number of points left off the axis)."""
  lows, highs = np.asarray(lows, float), np.asarray(highs, float)
  finite = np.isfinite(lows) & np.isfinite(highs)
  late = finite & (steps >= np.median(steps[finite]))
  low, high = np.min(lows[late]), np.max(highs[late])
  spread = max(high - low, 1e-3 * max(abs(high), 1.0))
  keep = finite & (lows >= low - room * spread) & (highs <= high + room * spread)
  low, high = np.min(lows[keep]), np.max(highs[keep])
  pad = 0.08 * max(high - low, spread)
  return low - pad, high + pad, int(np.sum(finite & ~keep))


def _note_off_axis(ax, count: int, what: str) -> None:
  if count:
    ax.text(0.99, 0.99, f"{count} earlier {what} off the axis", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="dimgray",
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))


def plot(loss: dict[str, pd.DataFrame], raw_loss: dict[str, pd.DataFrame],
         valid: dict[str, pd.DataFrame], path: str, title: str, loss_key: str,
         window: int) -> None:
  """Two panels: the smoothed training loss (seed mean, min-max band, the unsmoothed seed mean
  faint) and the validation AUC (seed mean ± std)."""
  import matplotlib  # noqa: PLC0415 - only the plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(12, 4.8))
  lows, highs, steps = [], [], []
  for name, frame in loss.items():
    color, label = COLORS.get(name), table4.LABELS[name]
    mean, low, high = frame.mean(axis=1), frame.min(axis=1), frame.max(axis=1)
    ax_loss.plot(raw_loss[name].index, raw_loss[name].mean(axis=1), color=color, alpha=0.25,
                 lw=0.8)
    ax_loss.plot(mean.index, mean, color=color, lw=1.8, label=label)
    if frame.shape[1] > 1:
      ax_loss.fill_between(mean.index, low, high, color=color, alpha=0.15, lw=0)
    lows.append(low)
    highs.append(high)
    steps.append(frame.index.to_numpy())
  if loss:
    bottom, top, off = zoomed_limits(np.concatenate(lows), np.concatenate(highs),
                                     np.concatenate(steps))
    ax_loss.set_ylim(bottom, top)
    _note_off_axis(ax_loss, off, "points")
  seeds = max((f.shape[1] for f in loss.values()), default=0)
  ax_loss.set_title(f"Training loss ({loss_key}, centred mean of {window} logs; mean over "
                    f"{runner.plural(seeds, 'seed')}" + (", band min–max)" if seeds > 1 else ")"),
                    fontsize=10)
  ax_loss.set_xlabel("training step")
  ax_loss.set_ylabel("training loss (window mean, smoothed)")

  lows, highs, steps = [], [], []
  for name, frame in valid.items():
    color, label = COLORS.get(name), table4.LABELS[name]
    mean, std = frame.mean(axis=1), frame.std(axis=1).fillna(0.0)
    ax_auc.errorbar(mean.index, mean, yerr=std, color=color, marker="o", ms=3.5, lw=1.5,
                    capsize=3, label=label)
    best = mean.idxmax()
    ax_auc.annotate(f"{mean[best]:.4f}", (best, mean[best] + std[best]),
                    textcoords="offset points", xytext=(0, 4), ha="center", va="bottom",
                    fontsize=7, color=color, bbox=dict(boxstyle="round,pad=0.15", fc="white",
                                                       ec="none", alpha=0.8))
    lows.append(mean - std)
    highs.append(mean + std)
    steps.append(frame.index.to_numpy())
  if valid:
    bottom, top, off = zoomed_limits(np.concatenate(lows), np.concatenate(highs),
                                     np.concatenate(steps))
    ax_auc.set_ylim(bottom, top + 0.08 * (top - bottom))  # room for the labels of the best
    _note_off_axis(ax_auc, off, "validations")
  seeds = max((f.shape[1] for f in valid.values()), default=0)
  ax_auc.set_title(f"Validation AUC (mean ± std over {runner.plural(seeds, 'seed')}; "
                   "best of each mean labelled)", fontsize=10)
  ax_auc.set_xlabel("training step")
  ax_auc.set_ylabel("validation AUC")
  for ax in (ax_loss, ax_auc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def draw(runs: str, loss_key: str = "train/loss", window: int = 5) -> pd.DataFrame:
  """Writes figure5.png and figure5.md into `runs`; returns the best-validation table."""
  valid = curves(runs, VALID_KEY)
  raw_loss = curves(runs, loss_key)
  if not valid and not raw_loss:
    names = ", ".join(runner.slug(n) for n, _, _ in table4.VARIANTS)
    raise runner.LaunchError(f"no <variant>/seed<k>/metrics/metrics.jsonl in {runs} "
                             f"(variants: {names}); run `python -m launch.table4 "
                             f"--out={runs}` first")
  loss = {name: frame.apply(lambda s: smooth(s, window)) for name, frame in raw_loss.items()}
  title = f"Figure 5: MIAN's Transformer variants over training ({os.path.normpath(runs)})"
  plot(loss, raw_loss, valid, os.path.join(runs, "figure5.png"), title, loss_key, window)
  best = best_validation(valid)
  note = ("Validation AUC is computed on the whole validation split at every "
          "`train.eval_every_steps`; the seed mean is taken at each validation step.")
  writers.write_text_atomic(os.path.join(runs, "figure5.md"),
                            f"# {title}\n\n{best_markdown(best) if len(best) else ''}\n{note}\n")
  return best


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("runs", "runs/table4", "the --out of python -m launch.table4",
                      flag_values=fv)
  flags.DEFINE_string("loss_key", "train/loss",
                      "the logged training scalar to draw (train/loss, train/bce)", flag_values=fv)
  flags.DEFINE_integer("smooth_window", 5,
                       "logged loss values per centred moving mean (1: no smoothing)",
                       lower_bound=1, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
  args = runner.parse_flags(argv, __doc__, define_flags)
  try:
    best = draw(args.runs, args.loss_key, args.smooth_window)
  except runner.LaunchError as e:
    sys.exit(f"error: {e}")
  print(best_markdown(best) if len(best) else "no validation AUC logged yet")
  return best


if __name__ == "__main__":
  main()
