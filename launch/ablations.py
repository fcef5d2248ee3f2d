"""Runs the Table 3 ablations, or Table 2's model comparison, over seeds; prints and plots it.

  python -m launch.ablations --config=configs/synthetic.py --seeds=0,1,2 --out=runs/ablations
  python -m launch.ablations --variants=mian,lr,wide_deep,dcn,deepfm,xdeepfm,din,dien \\
      --config=configs/movielens.py --out=runs/table2_ml100k
  python -m launch.ablations --config=configs/amazon_like.py --seeds=0,1,2 \\
      --variants='paper literal,paper literal + position_embedding=learned' --out=runs/departures

Run it from the repository root, like `python -m mian_jax.main`. Each (variant, seed) is one
`python -m mian_jax.main` run in `<out>/<variant>/seed<k>`, with its output in `log.txt` there.
A finished run is reused only when its recorded config is the requested one, so the script can
be interrupted and restarted; a changed config stops it with the keys that differ
(--rerun_changed moves the old run aside). The machinery is launch/runner.py, shared with
launch/sweep.py, which also searches a grid per model. Results: `<out>/results.csv` (one row
per run), `<out>/summary.md` (a Markdown table: test AUC mean ± std per variant, its difference
to the first, the oracle AUC when the data knows it) and `<out>/ablations.png`. Each run's
metrics are those of its best validation step (`eval.report_step`). --variants names entries
of VARIANTS separated by commas (no name holds one).
"""

from __future__ import annotations

import os
import sys

import pandas as pd
from absl import flags

from launch import runner
from mian_jax import writers
from mian_jax.config_defaults import PAPER_LITERAL, get_base_config

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
    # The readings of issue 10's diagnosis (docs/experiments.md); one departure undone each.
    "DIN IBIM score": ["--config.model.ibim_score=din"],
    "linear scores": ["--config.model.score_activation=none"],
    "per-position IBIM weights": ["--config.model.ibim_score_weights=per_position"],
    "GIM weighted concat": ["--config.model.gim_combine=weighted_concat"],
    "concat values": ["--config.model.interaction_values=concat"],
    "concat e_b in GIM": ["--config.model.gim_behavior=concat"],
    "oldest-first slots": ["--config.model.history_layout=oldest_first"],
}


def _flags(values: dict[str, object]) -> list[str]:
  return [f"--config.{path}={value}" for path, value in values.items()]


def literal_variants() -> dict[str, list[str]]:
  """MIAN as the paper's text reads literally ("paper literal": every key of
  config_defaults.PAPER_LITERAL, docs/model.md "Departures from the text"), and per departure
  "paper literal + <key>=<default>": the literal reading with that one key back at its default."""
  defaults = get_base_config()
  variants = {"paper literal": _flags(PAPER_LITERAL),
              "paper literal with oldest-first slots": [
                  *_flags(PAPER_LITERAL), "--config.model.history_layout=oldest_first"]}
  for path in PAPER_LITERAL:
    default = _get(defaults, path)
    key = path.rsplit(".", 1)[-1]
    variants[f"paper literal + {key}={default}"] = _flags({**PAPER_LITERAL, path: default})
  # Each of TRAINABLE alone leaves the literal model at AUC 0.5 (docs/model.md), so every other
  # departure is also measured on the literal reading with those two back at their defaults.
  trainable = {**PAPER_LITERAL, **{path: _get(defaults, path) for path in TRAINABLE}}
  variants["trainable literal"] = _flags(trainable)
  for path in PAPER_LITERAL:
    if path not in TRAINABLE:
      default = _get(defaults, path)
      variants[f"trainable literal + {path.rsplit('.', 1)[-1]}={default}"] = _flags(
          {**trainable, path: default})
  return variants


# The two departures without which the literal MIAN does not learn at all (docs/model.md).
TRAINABLE = ("model.dense_init", "train.l2_scope")


def _get(config, path: str):
  for part in path.split("."):
    config = config[part]
  return config


VARIANTS.update(literal_variants())
# Table 2: every model of mian_jax.models.MODELS by name, e.g. --variants=mian,din,dien.
VARIANTS.update({name: [f"--config.model.name={name}"]
                 for name in ("lr", "wide_deep", "dcn", "deepfm", "xdeepfm", "din", "dien")})


def parse_variants(text: str) -> list[str]:
  """"a,b,c" -> names of VARIANTS (no name holds a comma); an unknown one is a one-line error."""
  names = [name.strip() for name in text.split(",")]
  unknown = [name for name in names if name not in VARIANTS]
  if unknown:
    raise runner.LaunchError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  return names


def plan(variants, seeds, out, extra) -> list[runner.Run]:
  for name in variants:
    runner.check_no_key_twice({f"{name!r}": VARIANTS[name], "the overrides after --": extra,
                               "--seeds": ["--config.train.seed=0"]})
  return [runner.Run(name, (), seed,
                     os.path.abspath(os.path.join(out, runner.slug(name), f"seed{seed}")),
                     tuple(VARIANTS[name] + list(extra)))
          for name in variants for seed in seeds]


def run_all(config, variants, seeds, out, extra, rerun_changed=False) -> pd.DataFrame:
  """Runs (or reuses) every (variant, seed); one row per run."""
  rows = runner.run_all(plan(variants, seeds, out, extra), config, rerun_changed)
  return pd.DataFrame(rows).rename(columns={"name": "variant"})


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
  """Per variant (in the order run): test AUC mean and std over seeds, and the rest; delta_auc
  is the difference of mean test AUC to the first variant."""
  order = list(dict.fromkeys(frame.variant))
  summary = frame.groupby("variant").agg(
      valid_auc_mean=("valid_auc", "mean"), valid_auc_std=("valid_auc", "std"),
      auc_mean=("test_auc", "mean"),
      auc_std=("test_auc", "std"), gauc_mean=("test_gauc", "mean"),
      logloss_mean=("test_logloss", "mean"), oracle_auc=("oracle_auc", "mean"),
      seeds=("seed", "count")).loc[order]
  summary["delta_auc"] = summary.auc_mean - summary.loc[order[0], "auc_mean"]
  return summary


def summary_markdown(summary: pd.DataFrame) -> str:
  first = summary.index[0]
  rows = [[name, runner.mean_std(r.auc_mean, r.auc_std), f"{r.delta_auc:+.4f}", r.gauc_mean,
           r.logloss_mean, runner.mean_std(r.valid_auc_mean, r.valid_auc_std), r.oracle_auc,
           int(r.seeds)]
          for name, r in summary.iterrows()]
  return runner.markdown_table(
      ["variant", "test AUC (mean ± std)", f"Δ AUC vs {first}", "test gAUC", "test logloss",
       "valid AUC (mean ± std)", "oracle AUC", "seeds"], rows, [False] + [True] * 7)


def plot(summary: pd.DataFrame, path: str, title: str = "Test AUC per variant") -> None:
  runner.plot_summary(summary, list(summary.index), summary.auc_mean, summary.auc_std, path,
                      title, "test AUC")


def define_flags(fv: flags.FlagValues) -> None:
  runner.define_launch_flags(fv, out="runs/ablations")
  flags.DEFINE_string("variants", ",".join(VARIANTS),
                      f"comma-separated subset of: {', '.join(VARIANTS)}", flag_values=fv)


def main():
  args = runner.parse_flags(None, __doc__, define_flags, rest="overrides")
  seeds = [int(s) for s in args.seeds.split(",")]
  try:
    variants = parse_variants(args.variants)
    os.makedirs(args.out, exist_ok=True)
    frame = run_all(args.config, variants, seeds, args.out, args.overrides, args.rerun_changed)
  except runner.LaunchError as e:
    sys.exit(f"error: {e}")
  frame.to_csv(os.path.join(args.out, "results.csv"), index=False)
  summary = summarise(frame)
  title = f"Test AUC per variant: {args.config}, {runner.plural(len(seeds), 'seed')}"
  table = summary_markdown(summary)
  writers.write_text_atomic(os.path.join(args.out, "summary.md"), f"# {title}\n\n{table}")
  print(table)
  plot(summary, os.path.join(args.out, "ablations.png"), title)


if __name__ == "__main__":
  main()
