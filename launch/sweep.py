"""The same small grid search for every model, each selected on validation AUC (Table 2).

  python -m launch.sweep --config=configs/synthetic.py --models=mian,lr,din \
      --grid='train.learning_rate=1e-3,3e-3;model.embed_dim=8,16' --seeds=0,1,2 \
      --out=runs/sweep_synthetic [--variants='w/o IBIM'] [--rerun_changed] \
      [-- --config.train.num_epochs=0.5]

Run it from the repository root, like `python -m mian_jax.main`. The grid is the Cartesian
product of `key=v1,v2` groups separated by `;` (a value may be a tuple: `model.mlp_dims=(8,4),
(16,8)`); every point applies to every model (default: all eight) and to every `--variants` entry
of launch/ablations.py's VARIANTS, and every run gets the overrides after `--`. Each
(model, point, seed) is one `python -m mian_jax.main` run in `<out>/<model>/<point>/seed<k>`,
with its output in `log.txt` there. A finished run is reused only when its recorded config is
the requested one (launch/runner.py); interrupt and rerun the same command to go on.

Selection: for each model, the grid point with the highest validation AUC averaged over seeds
(each run's AUC at the step its `eval.report_step` selects, by default its best validation step).
That point's test AUC (mean ± std over seeds), logloss, gAUC and the oracle AUC are reported;
test never selects anything. Outputs in --out:
  results.csv   one row per run (model, grid values, seed, valid/test metrics, best step)
  grid.md       every model x grid point: validation AUC mean ± std, the selected point marked
  summary.md    the selected setting per model: validation AUC, test AUC, Δ to MIAN, oracle
  summary.csv   the same, unformatted
  summary.png   test AUC per model with error bars
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Sequence

import pandas as pd

from launch import ablations, runner
from mian_jax import writers

MODELS = ("mian", "lr", "wide_deep", "dcn", "deepfm", "xdeepfm", "din", "dien")


def split_values(text: str) -> list[str]:
  """Splits on commas outside brackets: "1e-3,(8,4)" -> ["1e-3", "(8,4)"]."""
  values, depth, current = [], 0, ""
  for char in text:
    depth += (char in "([{") - (char in ")]}")
    if char == "," and depth == 0:
      values.append(current.strip())
      current = ""
    else:
      current += char
  values.append(current.strip())
  return [v for v in values if v]


def parse_grid(text: str) -> tuple[list[str], list[tuple[tuple[str, str], ...]]]:
  """"a.b=1,2;c.d=x,y" -> (["a.b", "c.d"], the four points as ((key, value), ...))."""
  keys, axes = [], []
  for group in filter(None, (g.strip() for g in text.split(";"))):
    key, sep, values = group.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key or not split_values(values):
      raise runner.LaunchError(f"grid group {group!r}: expected key=value1,value2,...")
    if key in keys:
      raise runner.LaunchError(f"grid key {key} appears twice")
    keys.append(key)
    axes.append([(key, v) for v in split_values(values)])
  return keys, [tuple(point) for point in itertools.product(*axes)]


def entry_overrides(name: str) -> list[str]:
  """A model runs with its name set explicitly; a variant with its VARIANTS overrides."""
  if name in MODELS:
    return [f"--config.model.name={name}"]
  return list(ablations.VARIANTS[name])


def plan(entries: Sequence[str], points, seeds: Sequence[int], out: str,
         extra: Sequence[str]) -> list[runner.Run]:
  """Every (entry, grid point, seed) as a Run, in that nesting order."""
  unknown = [e for e in entries if e not in MODELS and e not in ablations.VARIANTS]
  if unknown:
    raise runner.LaunchError(f"unknown models or variants {unknown}; choose from "
                             f"{sorted(set(MODELS) | set(ablations.VARIANTS))}")
  runs = []
  for name in entries:
    for point in points:
      point_flags = [f"--config.{k}={v}" for k, v in point]
      runner.check_no_key_twice({f"{name!r}": entry_overrides(name), "the grid": point_flags,
                                 "the overrides after --": extra,
                                 "--seeds": ["--config.train.seed=0"]})
      point_dir = ",".join(f"{k}={v}" for k, v in point)
      for seed in seeds:
        workdir = os.path.join(out, runner.slug(name), *([runner.slug(point_dir)] if point else
                                                         []), f"seed{seed}")
        runs.append(runner.Run(name, point, seed, os.path.abspath(workdir),
                               tuple(entry_overrides(name) + point_flags + list(extra))))
  return runs


def select(frame: pd.DataFrame, keys: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
  """Per model, the grid point with the highest mean validation AUC over seeds.

  Returns (grid, summary): grid has one row per model x point (means, stds, seeds, "selected");
  summary one row per model (index) with its selected point's row and "delta_test_auc", the
  difference of mean test AUC to MIAN (to the first model if MIAN was not run).
  """
  grid = frame.groupby(["model", *keys], sort=False).agg(
      valid_auc_mean=("valid_auc", "mean"), valid_auc_std=("valid_auc", "std"),
      test_auc_mean=("test_auc", "mean"), test_auc_std=("test_auc", "std"),
      test_logloss_mean=("test_logloss", "mean"), test_gauc_mean=("test_gauc", "mean"),
      oracle_auc=("oracle_auc", "mean"), seeds=("seed", "count")).reset_index()
  chosen = grid.groupby("model", sort=False).valid_auc_mean.idxmax()
  grid["selected"] = grid.index.isin(chosen.to_numpy())
  summary = grid.loc[chosen.to_numpy()].set_index("model")
  reference = "mian" if "mian" in summary.index else summary.index[0]
  summary["delta_test_auc"] = summary.test_auc_mean - summary.loc[reference, "test_auc_mean"]
  summary.attrs["reference"] = reference
  return grid, summary


def grid_markdown(grid: pd.DataFrame, keys: Sequence[str]) -> str:
  rows = [[r.model, *(r[k] for k in keys), runner.mean_std(r.valid_auc_mean, r.valid_auc_std),
           int(r.seeds), "✓" if r.selected else ""] for _, r in grid.iterrows()]
  return runner.markdown_table(["model", *keys, "valid AUC (mean ± std)", "seeds", "selected"],
                               rows, [False] * (1 + len(keys)) + [True, True, False])


def summary_markdown(summary: pd.DataFrame, keys: Sequence[str], title: str) -> str:
  reference = summary.attrs["reference"]
  headers = ["model", *keys, "valid AUC", "test AUC (mean ± std)",
             f"Δ test AUC vs {reference}", "test logloss", "test gAUC", "oracle AUC", "seeds"]
  rows = [[model, *(r[k] for k in keys), runner.mean_std(r.valid_auc_mean, r.valid_auc_std),
           runner.mean_std(r.test_auc_mean, r.test_auc_std), f"{r.delta_test_auc:+.4f}",
           r.test_logloss_mean, r.test_gauc_mean, r.oracle_auc, int(r.seeds)]
          for model, r in summary.iterrows()]
  table = runner.markdown_table(headers, rows, [False] * (1 + len(keys)) + [True] * 7)
  note = ("Each model at the grid point with the highest mean validation AUC over seeds "
          "(grid.md); every run's metrics are those of the step its `eval.report_step` "
          "selects.")
  heading = " · ".join(title.splitlines())
  return f"# {heading}\n\n{table}\n{note}\n"


def write_outputs(frame: pd.DataFrame, keys: Sequence[str], out: str, title: str) -> pd.DataFrame:
  """Writes results.csv, grid.md, summary.md, summary.csv and summary.png; returns the summary."""
  frame.to_csv(os.path.join(out, "results.csv"), index=False)
  grid, summary = select(frame, keys)
  writers.write_text_atomic(os.path.join(out, "grid.md"), grid_markdown(grid, keys))
  writers.write_text_atomic(os.path.join(out, "summary.md"),
                            summary_markdown(summary, keys, title))
  summary.to_csv(os.path.join(out, "summary.csv"))
  labels = [model + "".join(f"\n{k.split('.')[-1]}={r[k]}" for k in keys)
            for model, r in summary.iterrows()]
  oracle = summary.oracle_auc.dropna()
  runner.plot_bars(labels, summary.test_auc_mean, summary.test_auc_std,
                   os.path.join(out, "summary.png"), title,
                   f"test AUC (mean ± std over {runner.plural(int(summary.seeds.max()), 'seed')})",
                   oracle=float(oracle.iloc[0]) if len(oracle) else None)
  return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = runner.launch_parser(__doc__, out="runs/sweep")
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma-separated models (default: all eight)")
  parser.add_argument("--variants", default="",
                      help=f"comma-separated extra entries of ablations.VARIANTS: "
                           f"{', '.join(ablations.VARIANTS)}")
  parser.add_argument("--grid", default="", help="'key=v1,v2;key2=w1,w2' (default: no grid)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
  args = parse_args(argv)
  entries = list(dict.fromkeys(n.strip() for n in f"{args.models},{args.variants}".split(",")
                               if n.strip()))
  seeds = [int(s) for s in args.seeds.split(",")]
  try:
    for flag in args.overrides:
      runner.override_key(flag)
    keys, points = parse_grid(args.grid)
    runs = plan(entries, points, seeds, args.out, args.overrides)
    os.makedirs(args.out, exist_ok=True)
    rows = runner.run_all(runs, args.config, args.rerun_changed)
  except runner.LaunchError as e:
    sys.exit(f"error: {e}")
  frame = pd.DataFrame(rows).rename(columns={"name": "model"})
  title = (f"Test AUC at each model's best validation setting: {args.config}, "
           f"{runner.plural(len(seeds), 'seed')}" + (f"\ngrid {args.grid}" if args.grid else ""))
  summary = write_outputs(frame, keys, args.out, title)
  print(runner.markdown_table(
      ["model", *keys, "valid AUC", "test AUC"],
      [[m, *(r[k] for k in keys), runner.mean_std(r.valid_auc_mean, r.valid_auc_std),
        runner.mean_std(r.test_auc_mean, r.test_auc_std)] for m, r in summary.iterrows()]))
  return summary


if __name__ == "__main__":
  main()
