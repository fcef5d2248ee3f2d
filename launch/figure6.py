"""Figure 6 of the paper: GIM's attention weights over its parts for a random sample of cases.

  python -m launch.figure6 --workdir=runs/table4/mian/seed0 [--cases=14] [--seed=0] \\
      [--split=test] [--step=best|latest|N]

--workdir is a finished or interrupted MIAN training run with GIM on. The weights come from the
predictions Parquet of `python -m mian_jax.evaluate --predictions` for that checkpoint,
`<workdir>/eval/<split>_predictions_step<N>.parquet` (its `attention_gim` column, the part names
in its metadata): when the file is not there yet, evaluate is run first, with the config the run
recorded (`evaluate` reads it from the workdir), its output in
`<workdir>/eval/evaluate_log.txt`. A rerun reuses the file. `--step=best` (the default) is the
checkpoint of the best validation AUC.

Writes `<workdir>/figure6.png`: a heat map of the weights (GIM's parts as rows, as in the paper;
`--cases` examples drawn at random with `--seed` as columns, labelled with their row in the
split, label and score; each value in its cell), beside the mean over the whole split; and
`<workdir>/figure6.md`: per part, the mean weight over the split and over the sample, and how
often it is an example's largest weight.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from absl import flags

from launch import runner
from mian_jax import writers

# The parts of r_g (eq. 14), as MIAN.gim_part_names() names them.
PART_MEANINGS = {"e_i": "candidate item", "e_c": "context fields", "e_b": "behaviours",
                 "e_u": "user profile", "R_ibim": "item × behaviours (IBIM)",
                 "R_iuim": "item × user (IUIM)", "R_icim": "item × context (ICIM)"}


def check_run(workdir: str) -> dict:
  """The recorded config of a MIAN run with GIM on; LaunchError (one line) otherwise."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise runner.LaunchError(f"{workdir} is not a training workdir (no config.json)")
  with open(path) as f:
    config = json.load(f)
  model = config["model"]
  if model["name"] != "mian":
    raise runner.LaunchError(f"{workdir} is a {model['name']} run (model.name={model['name']}); "
                             "Figure 6 shows the GIM weights of a MIAN run")
  if not model["use_gim"]:
    raise runner.LaunchError(f"{workdir} was trained without GIM (model.use_gim=False); "
                             "Figure 6 shows GIM's weights")
  return config


def _steps_in(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(e) for e in os.listdir(directory) if e.isdigit())


def checkpoint_step(workdir: str, step: str) -> int:
  """The step number `--step` names: "best" (checkpoints_best/), "latest" (the newest in
  checkpoints/) or a number."""
  if not step.isdigit() and step not in ("best", "latest"):
    raise runner.LaunchError(f"--step={step!r}: expected best, latest or a step number")
  directory = os.path.join(workdir, "checkpoints_best" if step == "best" else "checkpoints")
  steps = _steps_in(directory)
  if not steps:
    raise runner.LaunchError(f"no checkpoint in {directory} (--step={step})")
  if step.isdigit() and int(step) not in steps:
    raise runner.LaunchError(f"no checkpoint of step {step} in {directory} (there: {steps})")
  return int(step) if step.isdigit() else steps[-1]


def ensure_predictions(workdir: str, split: str, step: str) -> str:
  """The path of the predictions Parquet of `step` on `split`, made by mian_jax.evaluate when
  it does not exist yet."""
  number = checkpoint_step(workdir, step)
  path = os.path.join(workdir, "eval", f"{split}_predictions_step{number}.parquet")
  if os.path.isfile(path):
    return path
  log_path = os.path.join(workdir, "eval", "evaluate_log.txt")
  print(f"{workdir}: evaluating step {number} on {split} with --predictions, log in {log_path}")
  command = [sys.executable, "-m", "mian_jax.evaluate",
             f"--workdir={workdir}", f"--step={step}", f"--split={split}", "--predictions"]
  start = os.path.getsize(log_path) if os.path.isfile(log_path) else 0
  code = runner.launch(command, log_path)
  if code or not os.path.isfile(path):
    with open(log_path) as f:
      f.seek(start)
      print("".join(f.readlines()[-15:]).rstrip())  # the end of this evaluation's output
    raise runner.LaunchError(f"evaluating {workdir} failed (exit code {code}; expected "
                             f"{path}); its log is {log_path}")
  return path


def read_gim(path: str) -> tuple[np.ndarray, list[str], pd.DataFrame]:
  """(weights [examples, parts], part names, a frame of score and label) of a predictions
  Parquet."""
  table = pq.read_table(path)
  names = (table.schema.metadata or {}).get(b"attention_gim", b"").decode()
  if "attention_gim" not in table.column_names or not names:
    raise runner.LaunchError(f"{path} has no GIM weights (column attention_gim)")
  parts = names.split(",")
  weights = table.column("attention_gim").combine_chunks().flatten().to_numpy()
  return (weights.reshape(table.num_rows, len(parts)), parts,
          table.select(["score", "label"]).to_pandas())


def sample_rows(num_rows: int, cases: int, seed: int) -> np.ndarray:
  """`cases` distinct rows drawn at random with `seed`, in split order."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_rows, size=min(cases, num_rows), replace=False))


def summary_markdown(weights: np.ndarray, parts: Sequence[str], rows: np.ndarray) -> str:
  largest = np.bincount(weights.argmax(axis=1), minlength=len(parts)) / len(weights)
  split_mean, sample_mean = weights.mean(axis=0), weights[rows].mean(axis=0)
  table = runner.markdown_table(
      ["part", "what it is", f"mean weight, whole split ({len(weights)})",
       f"mean weight, sample ({len(rows)})", "share of examples where it weighs most"],
      [[p, PART_MEANINGS.get(p, ""), float(split_mean[k]), float(sample_mean[k]), float(largest[k])]
       for k, p in enumerate(parts)], [False, False, True, True, True])
  interaction = np.array([p.startswith("R_") for p in parts])
  share = (f"The interaction parts (R_*) hold {split_mean[interaction].sum():.4f} of the weight "
           f"over the split ({sample_mean[interaction].sum():.4f} over the sample), the "
           f"original parts {split_mean[~interaction].sum():.4f} "
           f"({sample_mean[~interaction].sum():.4f}).")
  return f"{table}\n{share}\n\nSampled rows of the split: {', '.join(map(str, rows))}.\n"


def plot(weights: np.ndarray, parts: Sequence[str], rows: np.ndarray, frame: pd.DataFrame,
         path: str, title: str) -> None:
  """Heat map: parts x sampled cases, each weight in its cell, beside the split mean."""
  import matplotlib  # noqa: PLC0415 - only the plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  sample = weights[rows].T  # [parts, cases]
  split_mean = weights.mean(axis=0)[:, None]
  # Colours diverge at the uniform weight 1/parts: red is more than an equal share, blue less.
  uniform = 1.0 / len(parts)
  values = np.concatenate([sample.ravel(), split_mean.ravel()])
  spread = max(float(np.max(np.abs(values - uniform))), 1e-3)
  norm = matplotlib.colors.TwoSlopeNorm(uniform, max(uniform - spread, 0.0), uniform + spread)
  fig, (ax, ax_mean) = plt.subplots(
      1, 2, figsize=(0.62 * len(rows) + 3.6, 0.5 * len(parts) + 2.4),
      gridspec_kw={"width_ratios": [len(rows), 1.4], "wspace": 0.04})
  for axis, cells in ((ax, sample), (ax_mean, split_mean)):
    image = axis.imshow(cells, cmap="RdBu_r", norm=norm, aspect="auto")
    for (i, j), value in np.ndenumerate(cells):
      axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7,
                color="white" if abs(norm(value) - 0.5) > 0.35 else "black")
  ax.set_yticks(range(len(parts)), [f"{p}: {PART_MEANINGS[p]}" if p in PART_MEANINGS else p
                                    for p in parts], fontsize=8)
  ax.set_xticks(range(len(rows)), [f"#{r}\ny={int(frame.label[r])}\np={frame.score[r]:.2f}"
                                   for r in rows], fontsize=7)
  ax.set_xlabel("sampled example (row in the split, label y, predicted click probability p)",
                fontsize=8)
  ax_mean.set_xticks([0], [f"mean of\nall {len(weights)}"], fontsize=7)
  ax_mean.set_yticks([])
  colorbar = fig.colorbar(image, ax=[ax, ax_mean], fraction=0.04, pad=0.02)
  colorbar.set_label(f"GIM weight (eq. 15), each column sums to 1\nwhite: uniform 1/{len(parts)}"
                     f" = {uniform:.3f}, red: more, blue: less", fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def draw(workdir: str, cases: int = 14, seed: int = 0, split: str = "test",
         step: str = "best") -> str:
  """Writes figure6.png and figure6.md into `workdir`; returns the Markdown."""
  check_run(workdir)
  workdir = os.path.abspath(workdir)
  path = ensure_predictions(workdir, split, step)
  weights, parts, frame = read_gim(path)
  rows = sample_rows(len(weights), cases, seed)
  number = checkpoint_step(workdir, step)
  run = os.path.relpath(workdir) if not os.path.relpath(workdir).startswith("..") else workdir
  which = f"checkpoint step {number}" + ("" if step.isdigit() else f" ({step})")
  title = (f"Figure 6: GIM's weights over its parts, {len(rows)} random {split} examples "
           f"(seed {seed})\n{run}, {which}")
  plot(weights, parts, rows, frame, os.path.join(workdir, "figure6.png"), title)
  text = f"# {' · '.join(title.splitlines())}\n\n{summary_markdown(weights, parts, rows)}"
  writers.write_text_atomic(os.path.join(workdir, "figure6.md"), text)
  return text


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "a MIAN training run with GIM on", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_integer("cases", 14, "examples to draw (the paper: 14)", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the sample", flag_values=fv)
  flags.DEFINE_enum("split", "test", ["valid", "test"], "the split to draw from", flag_values=fv)
  flags.DEFINE_string("step", "best", "best, latest or a step number", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> str:
  args = runner.parse_flags(argv, __doc__, define_flags)
  try:
    text = draw(args.workdir, args.cases, args.seed, args.split, args.step)
  except runner.LaunchError as e:
    sys.exit(f"error: {e}")
  print(text)
  return text


if __name__ == "__main__":
  main()
