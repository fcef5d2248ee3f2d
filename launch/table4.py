"""Table 4 of the paper: MIAN with a pre-LN, a post-LN or no Transformer in IBIM, over seeds.

  python -m launch.table4 --config=configs/synthetic.py --seeds=0,1,2 --out=runs/table4 \\
      [--rerun_changed] [-- --config.train.num_epochs=0.5 ...]
  python -m launch.figure5 --runs=runs/table4     # Figure 5 from the same runs

Run it from the repository root, like `python -m mian_jax.main`. The three variants are entries
of launch/ablations.py's VARIANTS ("mian", "post-LN Transformer", "no Transformer"), run in the
same `<out>/<variant>/seed<k>` workdirs by the same machinery (launch/runner.py): a finished run
is reused only when its recorded config is the requested one, so the command can be interrupted
and rerun; a changed config stops it with the keys that differ (--rerun_changed moves the old
run aside). An --out shared with launch/ablations.py reuses its MIAN and Transformer runs.

Every run is reported at its best validation step (`eval.report_step=best`, checked). Outputs in
--out: `table4.csv` (one row per run), `table4.md` (per variant: validation and test AUC mean ±
std over seeds, the test AUC difference to pre-LN paired by seed, test logloss and gAUC, the best
steps, the oracle AUC when the data knows it) and `table4.png` (test AUC with error bars).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import pandas as pd

from launch import ablations, runner
from mian_jax import writers

# Table 4's rows: (entry of ablations.VARIANTS, label, the model.transformer it must resolve to).
VARIANTS = (("mian", "MIAN (pre-LN Transformer)", "pre_ln"),
            ("post-LN Transformer", "post-LN Transformer", "post_ln"),
            ("no Transformer", "no Transformer", "none"))
LABELS = {name: label for name, label, _ in VARIANTS}
# The paper's Table 4 (its commercial data set, not public): test AUC, logloss.
PAPER = {"mian": (0.7674, 0.3097), "post-LN Transformer": (0.7662, 0.3103),
         "no Transformer": (0.7612, 0.3205)}


def plan(config: str, seeds: Sequence[int], out: str, extra: Sequence[str]) -> list[runner.Run]:
  """Every (variant, seed) as a Run, each checked to be MIAN with its Transformer and reported
  at its best validation step."""
  runs = ablations.plan([name for name, _, _ in VARIANTS], seeds, out, extra)
  expected = {name: transformer for name, _, transformer in VARIANTS}
  for run in runs[::len(seeds)]:  # the seeds of a variant differ only in train.seed
    resolved = runner.resolve_config(config, run.flags())
    found = (resolved["model"]["name"], resolved["model"]["transformer"],
             resolved["eval"]["report_step"])
    if found != ("mian", expected[run.name], "best"):
      raise runner.LaunchError(
          f"{run.name!r} resolves to model.name={found[0]}, model.transformer={found[1]}, "
          f"eval.report_step={found[2]}; Table 4 needs mian, {expected[run.name]}, best "
          "(drop the override after -- that changes it)")
  return runs


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
  """Per variant (Table 4's order): means and stds over seeds, and delta_auc(_std), the mean
  (and std) over seeds of the test AUC difference to pre-LN on the same seed."""
  order = [name for name, _, _ in VARIANTS if name in set(frame.variant)]
  summary = frame.groupby("variant").agg(
      valid_auc_mean=("valid_auc", "mean"), valid_auc_std=("valid_auc", "std"),
      auc_mean=("test_auc", "mean"), auc_std=("test_auc", "std"),
      logloss_mean=("test_logloss", "mean"), logloss_std=("test_logloss", "std"),
      gauc_mean=("test_gauc", "mean"), oracle_auc=("oracle_auc", "mean"),
      seeds=("seed", "count")).loc[order]
  summary["best_steps"] = [", ".join(str(int(s)) for s in frame[frame.variant == v].best_step
                                     if pd.notna(s)) for v in order]
  reference = frame[frame.variant == order[0]].set_index("seed").test_auc
  for name in order:
    paired = frame[frame.variant == name].set_index("seed").test_auc - reference
    summary.loc[name, "delta_auc"] = paired.mean()
    summary.loc[name, "delta_auc_std"] = paired.std()
  return summary


def table_markdown(summary: pd.DataFrame) -> str:
  first = summary.index[0]
  first_short = "pre-LN" if first == "mian" else LABELS[first]
  rows = []
  for k, (name, r) in enumerate(summary.iterrows(), 1):
    delta = "" if name == first else (f"{r.delta_auc:+.4f}" + (
        f" ± {r.delta_auc_std:.4f}" if pd.notna(r.delta_auc_std) else ""))
    rows.append([f"{k}) {LABELS[name]}", runner.mean_std(r.valid_auc_mean, r.valid_auc_std),
                 runner.mean_std(r.auc_mean, r.auc_std), delta,
                 runner.mean_std(r.logloss_mean, r.logloss_std), r.gauc_mean, r.best_steps,
                 r.oracle_auc, int(r.seeds)])
  return runner.markdown_table(
      ["variant", "valid AUC", "test AUC", f"Δ test AUC vs {first_short} (paired by seed)",
       "test logloss", "test gAUC", "best step per seed", "oracle AUC", "seeds"],
      rows, [False] + [True] * 8)


def write_outputs(frame: pd.DataFrame, out: str, title: str) -> pd.DataFrame:
  """Writes table4.csv, table4.md and table4.png into `out`; returns the summary."""
  frame.to_csv(os.path.join(out, "table4.csv"), index=False)
  summary = summarise(frame)
  paper = "; ".join(f"{LABELS[n]} {auc:.4f} / {loss:.4f}" for n, (auc, loss) in PAPER.items())
  note = ("Each run's metrics are those of its best validation step; ± is the standard "
          "deviation over training seeds. The paper's Table 4 (test AUC / logloss on its "
          f"non-public commercial data set): {paper}.")
  writers.write_text_atomic(os.path.join(out, "table4.md"),
                            f"# {title}\n\n{table_markdown(summary)}\n{note}\n")
  runner.plot_summary(summary, [LABELS[n] for n in summary.index], summary.auc_mean,
                      summary.auc_std, os.path.join(out, "table4.png"), title,
                      "test AUC at the best validation step")
  return summary


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
  args = runner.parse_flags(argv, __doc__,
                            lambda fv: runner.define_launch_flags(fv, out="runs/table4"),
                            rest="overrides")
  seeds = [int(s) for s in args.seeds.split(",")]
  try:
    for flag in args.overrides:
      runner.override_key(flag)
    runs = plan(args.config, seeds, args.out, args.overrides)
    os.makedirs(args.out, exist_ok=True)
    rows = runner.run_all(runs, args.config, args.rerun_changed)
  except runner.LaunchError as e:
    sys.exit(f"error: {e}")
  frame = pd.DataFrame(rows).rename(columns={"name": "variant"})
  title = (f"Table 4: MIAN's Transformer variants, {args.config}, "
           f"{runner.plural(len(seeds), 'seed')}")
  summary = write_outputs(frame, args.out, title)
  print(table_markdown(summary))
  return summary


if __name__ == "__main__":
  main()
