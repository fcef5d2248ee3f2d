"""Books size end to end: preparation, then each model's training and validation, measured.

  python -m benchmarks.scale --out=/tmp/scale                       # Books size, mian,din,dien
  python -m benchmarks.scale --out=/tmp/scale --size=small --steps=300 --eval_every=100

The raw files are those of `configs/amazon_like.py:size=<--size>` (generated into their cache
directory if missing). Stage 1 prepares them into `<out>/prepared` in a child process
(`benchmarks.prepare_amazon`: wall, CPU, peak RSS). Stage 2 trains each model of --models for
--steps steps with the config's defaults (its optimiser, batch size, periodic validation on
`eval.periodic_valid_examples`), validating every --eval_every steps, in a child process
(`python -m mian_jax.main`), and reads back: training samples/s (the median of the logged
rates after the first log, which includes compilation), peak RSS (and its anonymous part, sampled
from /proc: the rest is memory-mapped column pages, which the kernel can drop), the time of one
periodic validation and of the final full validation, validation AUC against steps, and the
epoch estimate (train examples / samples/s) with the share of it ten periodic validations an
epoch would cost. Writes `<out>/scale.md` (tables), `<out>/scale.json` and
`<out>/valid_auc.png`. The machine is shared: the load average around each stage is recorded.
Targets (issue 22, 2 cores): preparation <= 60 s and <= 3 GB; MIAN >= 7,600 samples/s, validation
AUC >= 0.68 at step 3,000, one periodic validation <= 60 s.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

from absl import flags

from benchmarks import common
from mian_jax import writers

GB = 2 ** 30


def run_measured(command: list[str], log_path: str) -> dict:
  """Runs `command` (cwd: the repository root, output to `log_path`); returns its wall time,
  peak RSS (the kernel's, via wait4) and peak anonymous RSS (sampled every 0.2 s)."""
  peak_anon = [0]
  with open(log_path, "w") as log:
    started = time.time()
    process = subprocess.Popen(command, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT)
    done = threading.Event()

    def sample():
      path = f"/proc/{process.pid}/status"
      while not done.wait(0.2):
        try:
          with open(path) as f:
            anon = next(int(x.split()[1]) for x in f if x.startswith("RssAnon:"))
          peak_anon[0] = max(peak_anon[0], anon)
        except (OSError, StopIteration, ValueError):
          pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
  return {"returncode": process.returncode, "wall_s": time.time() - started,
          "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 2 ** 20,
          "peak_anon_rss_gb": peak_anon[0] / 2 ** 20}


def prepare(args) -> dict:
  """Stage 1: benchmarks.prepare_amazon on the amazon_like files of --size (its JSON line)."""
  if args.skip_prepare and os.path.isfile(os.path.join(args.out, "prepared", "stats.json")):
    return {}
  command = [sys.executable, "-m", "benchmarks.prepare_amazon", f"--dir={args.out}",
             "--source=amazon_like", f"--size={args.size}", "--protocol=mian"]
  log = os.path.join(args.out, "prepare.log")
  load = os.getloadavg()[0]
  measured = run_measured(command, log)
  if measured["returncode"]:
    sys.exit(f"the preparation failed (status {measured['returncode']}); see {log}")
  with open(log) as f:
    result = json.loads(f.read().strip().splitlines()[-1])
  shutil.rmtree(os.path.join(args.out, "prepared"), ignore_errors=True)  # an earlier run's
  os.replace(os.path.join(args.out, "prepared-mian"), os.path.join(args.out, "prepared"))
  return {**result, "load_average": round(load, 1)}


def summarise_run(records: list[dict], train_examples: int, evals_per_epoch: int) -> dict:
  """Samples/s, validation times and the AUC curve from one run's metrics.jsonl records."""
  rates = [r["train/samples_per_second"] for r in records if "train/samples_per_second" in r]
  rate = statistics.median(rates[1:] or rates)
  # Periodic validations log "valid_subsample/" (the whole split, "valid/", when it is smaller
  # than eval.periodic_valid_examples); the reported step's full validation logs "valid/".
  prefix = ("valid_subsample/" if any("valid_subsample/auc" in r for r in records)
            else "valid/")
  last_train, periodic, curve, full = {}, [], [], None
  for r in records:
    if "train/loss" in r:
      last_train[r["step"]] = r["time"]
    elif prefix + "auc" in r:
      curve.append((r["step"], r[prefix + "auc"]))
      if r["step"] in last_train:
        periodic.append(r["time"] - last_train[r["step"]])
    elif "valid/auc" in r:
      full = r
  if prefix == "valid/":  # the last validation of the whole split is also the reported one
    full = next((r for r in reversed(records) if "valid/auc" in r), None)
  previous = max((r["time"] for r in records if r is not full and r.get("step") == full["step"]),
                 default=None) if full else None
  epoch_s = train_examples / rate
  periodic_s = statistics.median(periodic) if periodic else float("nan")
  return {"samples_per_s": rate, "epoch_h": epoch_s / 3600, "periodic_valid_s": periodic_s,
          "valid_share_of_epoch": evals_per_epoch * periodic_s / epoch_s,
          "full_valid_s": full["time"] - previous if full and previous else float("nan"),
          "full_valid_auc": full["valid/auc"] if full else float("nan"), "curve": curve}


def train(args, model: str, train_examples: int) -> dict:
  """Stage 2 for one model: --steps steps of its defaults on the prepared data, measured."""
  workdir = os.path.join(args.out, "runs", model)
  command = [sys.executable, "-m", "mian_jax.main",
             f"--config=configs/amazon_like.py:size={args.size},model={model}",
             f"--workdir={workdir}", f"--config.data.prepared_dir={args.out}/prepared",
             f"--config.train.num_train_steps={args.steps}",
             f"--config.train.eval_every_steps={args.eval_every}",
             "--config.train.eval_every_epochs=0", "--config.eval.final_test=False",
             "--config.eval.report_step=last", f"--config.checkpoint.every_steps={10 ** 9}",
             f"--config.train.seed={args.seed}", *args.overrides]
  if os.path.isdir(workdir):
    os.rename(workdir, f"{workdir}.old-{int(time.time())}")
  load = os.getloadavg()[0]
  measured = run_measured(command, workdir + ".log")
  if measured["returncode"]:
    sys.exit(f"{model} failed (status {measured['returncode']}); see {workdir}.log")
  records = writers.read_jsonl(os.path.join(workdir, "metrics", "metrics.jsonl"))
  summary = summarise_run(records, train_examples, args.evals_per_epoch)
  return {"model": model, **summary, "wall_s": measured["wall_s"], "cpu_s": measured["cpu_s"],
          "peak_rss_gb": measured["peak_rss_gb"],
          "peak_anon_rss_gb": measured["peak_anon_rss_gb"], "load_average": round(load, 1)}


def auc_at(curve: list[tuple[int, float]], step: int) -> float:
  return next((auc for s, auc in curve if s == step), float("nan"))


def report(args, prepared: dict, runs: list[dict]) -> str:
  lines = [f"# Scale benchmark: amazon_like size={args.size}, {args.steps} steps", ""]
  if prepared:
    lines += ["Preparation (protocol mian):", "", writers.markdown_table(
        ["reviews", "train / valid / test examples", "wall s", "CPU s", "peak RSS GB",
         "prepared GB", "load"],
        [[f"{prepared['num_reviews']:,}",
          " / ".join(f"{prepared['num_samples'][k]:,}" for k in ("train", "valid", "test")),
          f"{prepared['wall_s']:.1f}", f"{prepared['cpu_s']:.1f}",
          f"{prepared['peak_rss_gb']:.2f}", f"{prepared['prepared_gb']:.2f}",
          f"{prepared['load_average']:.1f}"]]), ""]
  steps = sorted({s for r in runs for s, _ in r["curve"]})
  shown = [s for s in steps if s % max(args.steps // 6, 1) == 0 or s == steps[-1]]
  lines += ["Training (each model's defaults; samples/s: median of the logged rates):", "",
            writers.markdown_table(
                ["model", "samples/s", "epoch h", "peak RSS GB (anon)", "periodic valid s",
                 "10 validations / epoch", "full valid s", "load",
                 *[f"AUC@{s}" for s in shown]],
                [[r["model"], f"{r['samples_per_s']:,.0f}", f"{r['epoch_h']:.2f}",
                  f"{r['peak_rss_gb']:.2f} ({r['peak_anon_rss_gb']:.2f})",
                  f"{r['periodic_valid_s']:.1f}", f"{100 * r['valid_share_of_epoch']:.1f}%",
                  f"{r['full_valid_s']:.1f}", f"{r['load_average']:.1f}",
                  *[f"{auc_at(r['curve'], s):.4f}" for s in shown]] for r in runs]), ""]
  return "\n".join(lines)


def plot(runs: list[dict], path: str) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in runs:
    ax.plot(*zip(*r["curve"]), marker="o", label=r["model"])
  ax.set_xlabel("training step (batch 128)")
  ax.set_ylabel("validation AUC (periodic subsample)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def define_flags(fv: flags.FlagValues) -> None:
  """The flags; --config.* flags for every model go after a `--`."""
  string = functools.partial(flags.DEFINE_string, flag_values=fv)
  integer = functools.partial(flags.DEFINE_integer, flag_values=fv)
  string("out", None, "prepared data, runs and the report")
  flags.mark_flag_as_required("out", flag_values=fv)
  string("size", "books", "configs/amazon_like.py size")
  string("models", "mian,din,dien", "comma-separated models")
  integer("steps", 3000, "training steps per model")
  integer("eval_every", 500, "steps between periodic validations")
  integer("evals_per_epoch", 10, "periodic validations an epoch (the Amazon configs' 0.1 epoch)")
  integer("seed", 0, "training seed")
  flags.DEFINE_bool("skip_prepare", False, "reuse <out>/prepared", flag_values=fv)


def main(argv=None) -> dict:
  args = common.parse_flags(argv, __doc__, define_flags, rest="overrides")
  args.out = os.path.abspath(args.out)
  os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
  prepared = prepare(args)
  with open(os.path.join(args.out, "prepared", "stats.json")) as f:
    train_examples = json.load(f)["num_samples"]["train"]
  runs = []
  for model in args.models.split(","):
    runs.append(train(args, model, train_examples))
    last = runs[-1]["curve"][-1] if runs[-1]["curve"] else (0, float("nan"))
    print(f"{model}: {runs[-1]['samples_per_s']:,.0f} samples/s, validation AUC "
          f"{last[1]:.4f} at step {last[0]}", flush=True)
  text = report(args, prepared, runs)
  result = {"size": args.size, "steps": args.steps, "cores": os.cpu_count(),
            "prepare": prepared, "runs": runs}
  writers.write_text_atomic(os.path.join(args.out, "scale.md"), text)
  writers.write_json_atomic(os.path.join(args.out, "scale.json"), result)
  plot(runs, os.path.join(args.out, "valid_auc.png"))
  print(text, flush=True)
  return result


if __name__ == "__main__":
  main()
