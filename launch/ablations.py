"""Runs the Table 3 ablations, or Table 2's model comparison, over seeds; prints and plots it.

  python launch/ablations.py --config=configs/synthetic.py --seeds=0,1,2 --out=runs/ablations
  python launch/ablations.py --variants=mian,lr,wide_deep,dcn,deepfm,xdeepfm,din,dien \
      --config=configs/movielens.py --out=runs/table2_ml100k

Each (variant, seed) is one `python -m mian_jax.main` run in `<out>/<variant>/seed<k>`; a run
that already finished is not repeated, so the script can be interrupted and restarted. Results:
`<out>/results.csv` (one row per run), `<out>/summary.md` (mean and spread per variant, the
oracle AUC beside them when the data knows it) and `<out>/ablations.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pandas as pd

# variant name -> config overrides (Table 3 of the paper, plus Table 4's Transformer variants).
VARIANTS = {
    "mian": [],
    "w/o IBIM": ["--config.model.use_ibim=False"],
    "w/o IUIM": ["--config.model.use_iuim=False"],
    "w/o ICIM": ["--config.model.use_icim=False"],
    "w/o GIM": ["--config.model.use_gim=False"],
    "w/o IUIM&ICIM": ["--config.model.use_iuim=False", "--config.model.use_icim=False"],
    "post-LN Transformer": ["--config.model.transformer=post_ln"],
    "no Transformer": ["--config.model.transformer=none"],
    "bilinear IBIM score": ["--config.model.ibim_score=bilinear"],
}
# Table 2: every model of mian_jax.models.MODELS by name, e.g. --variants=mian,din,dien.
VARIANTS.update({name: [f"--config.model.name={name}"]
                 for name in ("lr", "wide_deep", "dcn", "deepfm", "xdeepfm", "din", "dien")})


def build_command(config: str, workdir: str, seed: int, overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "mian_jax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.train.seed={seed}", *overrides]


def run_all(config, variants, seeds, out, extra):
  rows = []
  for name in variants:
    for seed in seeds:
      workdir = os.path.join(out, name.replace("/", "_").replace(" ", "_"), f"seed{seed}")
      metrics_path = os.path.join(workdir, "eval", "test_metrics.json")
      if not os.path.isfile(metrics_path):
        start = time.time()
        print(f"[{name} seed {seed}] running ...", flush=True)
        result = subprocess.run(build_command(config, workdir, seed, VARIANTS[name] + extra),
                                capture_output=True, text=True)
        if result.returncode:
          sys.exit(f"{name} seed {seed} failed:\n{result.stderr[-3000:]}")
        print(f"[{name} seed {seed}] done in {time.time() - start:.0f}s", flush=True)
      with open(metrics_path) as f:
        test = json.load(f)
      rows.append({"variant": name, "seed": seed, **{k: test.get(k) for k in
                                                     ("auc", "gauc", "logloss", "oracle_auc")}})
  return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
  order = list(dict.fromkeys(frame.variant))
  summary = frame.groupby("variant").agg(
      auc_mean=("auc", "mean"), auc_std=("auc", "std"), gauc_mean=("gauc", "mean"),
      logloss_mean=("logloss", "mean"), oracle_auc=("oracle_auc", "mean"),
      seeds=("seed", "count")).loc[order]
  base = summary.loc[order[0], "auc_mean"]
  summary["delta_auc"] = summary.auc_mean - base
  return summary


def plot(summary: pd.DataFrame, path: str) -> None:
  import matplotlib  # noqa: PLC0415 - only needed here
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(8, 0.5 * len(summary) + 1.5))
  ax.barh(summary.index[::-1], summary.auc_mean[::-1], xerr=summary.auc_std[::-1].fillna(0),
          color="tab:blue", alpha=0.8)
  if summary.oracle_auc.notna().all():
    ax.axvline(summary.oracle_auc.iloc[0], color="black", ls="--", label="oracle AUC")
    ax.legend(loc="lower right")
  low = (summary.auc_mean - 2 * summary.auc_std.fillna(0)).min()
  high = summary.auc_mean.max()
  if summary.oracle_auc.notna().all():
    high = max(high, summary.oracle_auc.max())
  ax.set_xlim(low - 0.01, high + 0.01)
  ax.set_xlabel(f"test AUC (mean ± std over {int(summary.seeds.max())} seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated subset of: {', '.join(VARIANTS)}")
  parser.add_argument("--out", default="runs/ablations")
  parser.add_argument("overrides", nargs="*", help="extra --config.* overrides for every run, after a `--`, e.g. "
                           "`-- --config.train.optimizer=lazy_adam`")
  args = parser.parse_args()
  variants = [v.strip() for v in args.variants.split(",")]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    sys.exit(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.out, exist_ok=True)
  frame = run_all(args.config, variants, seeds, args.out, args.overrides)
  frame.to_csv(os.path.join(args.out, "results.csv"), index=False)
  summary = summarise(frame)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary.to_markdown(floatfmt=".4f") if _has_tabulate() else summary.to_string())
  print(summary.to_string(float_format=lambda x: f"{x:.4f}"))
  plot(summary, os.path.join(args.out, "ablations.png"))


def _has_tabulate() -> bool:
  try:
    import tabulate  # noqa: F401, PLC0415
    return True
  except ImportError:
    return False


if __name__ == "__main__":
  main()
