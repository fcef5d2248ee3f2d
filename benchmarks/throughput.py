"""Training and evaluation throughput of our models on Amazon-sized vocabularies (synthetic ids),
optionally beside DeepCTR-Torch's DIN and DeepFM on the same arrays (--peer).

  python -m benchmarks.throughput --models=mian,din --batch_sizes=128,1024 \\
      --vocab=electronics --out=runs/throughput.jsonl [--optimizer=lazy_adam] \\
      [--peer [--repeats=3] [--peer_threads=N] [--peer_python=.venv-torch/bin/python]]

--vocab: "electronics" (~63 k items, 801 categories, ~192 k users) or "books" (~368 k items,
1.6 k categories, ~604 k users), the sizes of Table 1 of the paper; 30 behaviours per example;
"tiny" is for smoke tests. The models use mian_jax/config_defaults.py's base config (§4.3
settings) with train.batch_size = the batch size and train.optimizer = --optimizer ("adam": optax
Adam over every parameter; "lazy_adam": our row-sparse lazy Adam, mian_jax/optim.py).

Each (model, batch size) runs in its own process, so peak RSS is that pair's own. Measured:
- compile_s: the first train step (trace, lower, compile, run);
- train_samples_per_s: steady state, after compilation, over `--seconds` of train steps on
  batches already on the device (the model step alone);
- input_samples_per_s: the host input loop alone (gather a batch from the arrays and hand it to
  the device), i.e. what the pipeline could feed; its share of a step is reported too;
- eval_samples_per_s: the jitted forward pass;
- peak_rss_mb: the process's peak resident memory.
Results print as a table and append one JSON object per pair to --out (keys "impl": "mian_jax",
"model", "batch_size", "optimizer", the measurements above, "devices", "max_steps_in_flight",
"backend", "cpu_count").

--max_steps_in_flight: how many train steps may be unfinished (`steps.bound_in_flight`; the
timed loop never waits otherwise). Default: 8 on several CPU devices, where XLA:CPU deadlocks
beyond 32 (docs/performance.md, "DIN hung with two CPU devices"), else unbounded; 0: unbounded.

--peer: the arrays are written once to a temporary prepared directory (removed at the end) that
both implementations read. For each model DeepCTR-Torch has (din, deepfm; other models are
measured on our side only) and each batch size, ours and theirs run alternately, --repeats
times; each pair reports the median per implementation. The peer is benchmarks/deepctr_peer.py
in mode "throughput", run by --peer_python (a separate venv with torch and deepctr-torch; see
compare_deepctr.py for how to create it). It builds the model of compare_deepctr.py with the
same hyper-parameters (embedding width, MLP and attention widths, dropout, init std, learning
rate and Adam betas / eps, L2 mapped as compare_deepctr's "matched" --peer_l2) and takes the
same batches; it trains with torch.optim.Adam over every parameter (as DeepCTR-Torch's `fit`)
whatever --optimizer says. Its measurements are those above except input_samples_per_s, with
one difference: torch compiles nothing, so its compile_s is the time of its first training
step. The peer gets its best settings on a CPU: torch.set_num_threads(--peer_threads, default
os.cpu_count()) and torch.set_flush_denormal(True) (about 1.45x faster for its DIN: its Adam
update over the embedding tables slows down on denormal moments); its row records them
("torch_threads", "flush_denormal") and the torch and deepctr-torch versions. Its rows have
"impl": "deepctr_torch"; our row of the same pair gets "ratio_train_vs_peer" and
"ratio_eval_vs_peer" (ours / theirs samples/s), and a summary table of the ratios ends the run.
With 2 busy cores, fewer peer threads can be much faster (see compare_deepctr.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from absl import flags

from benchmarks import common, compare_deepctr

PEER_MODELS = compare_deepctr.MODELS  # the models DeepCTR-Torch has
# The measurements taken as the median over --repeats runs.
METRICS = ("train_samples_per_s", "eval_samples_per_s", "input_samples_per_s",
           "input_share_of_step", "compile_s", "peak_rss_mb")


def write_shared_data(directory: str, schema, columns) -> None:
  """Writes the train arrays as a prepared directory that both implementations read.

  Valid and test (read by neither) are the first rows of train, to keep the directory small.
  """
  from mian_jax.data import schema as schema_lib  # noqa: PLC0415
  n = schema.size("train")
  k = min(n, 1024)
  head = {name: a[:k] for name, a in columns.items()}
  schema = dataclasses.replace(schema, num_examples=(("train", n), ("valid", k), ("test", k)))
  schema_lib.write_prepared(directory, schema, {"train": columns, "valid": head, "test": head})


def load_shared_data(directory: str):
  """The (schema, train columns in memory) of a directory written by `write_shared_data`."""
  from mian_jax.data import schema as schema_lib  # noqa: PLC0415
  schema = schema_lib.read_schema(directory)
  split = schema_lib.load_split(directory, "train", schema)
  return schema, {name: np.array(a) for name, a in split.items()}


def measure(model_name: str, batch_size: int, vocab: str, seconds: float,
            optimizer: str = "adam", data_dir: str = "",
            max_steps_in_flight: int | None = None, mesh_model: int = 1,
            row_shard_min_rows: int = 0) -> dict:
  """Measures one (model, batch size) pair in this process (on `data_dir`'s arrays if given);
  `max_steps_in_flight`: the limit of `steps.bound_in_flight` (None: the train step's own);
  `mesh_model`, `row_shard_min_rows`: config.sharding's model and row_shard_min_rows (the
  tables of at least that many rows row-sharded over `mesh_model` devices)."""
  import jax  # noqa: PLC0415

  from mian_jax import sharding, steps  # noqa: PLC0415

  schema, columns = load_shared_data(data_dir) if data_dir else common.make_data(vocab)
  config = common.make_config(model_name, batch_size, optimizer)
  config.sharding.model = mesh_model
  config.sharding.row_shard_min_rows = row_shard_min_rows
  run = common.setup_arrays(config, schema, columns)
  mesh, batches, state, step_fn = run.mesh, run.batches, run.state, run.train_step
  if max_steps_in_flight is not None:
    jitted = step_fn.step if isinstance(step_fn, steps.BoundedStep) else step_fn
    step_fn = steps.bound_in_flight(jitted, mesh, max_steps_in_flight)
  rng = jax.random.PRNGKey(1)

  # The train loop's form of a batch: one packed array per batch (sharding.pack_to_global).
  start = time.perf_counter()
  state, metrics = step_fn(state, sharding.pack_to_global(batches.batch(0), mesh), rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start

  packed_batches = [sharding.pack_to_global(batches.batch(s), mesh) for s in range(1, 9)]
  trained, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    state, metrics = step_fn(state, packed_batches[trained % len(packed_batches)], rng)
    trained += 1
  jax.block_until_ready(metrics)
  train_rate = trained * batch_size / (time.perf_counter() - start)

  fed, start = 0, time.perf_counter()
  while time.perf_counter() - start < min(seconds, 5.0):
    jax.block_until_ready(sharding.pack_to_global(batches.batch(fed), mesh).packed)
    fed += 1
  input_rate = fed * batch_size / (time.perf_counter() - start)

  device_batches = [sharding.to_global(batches.batch(s), mesh) for s in range(1, 9)]
  eval_fn = run.eval_step
  jax.block_until_ready(eval_fn(state, run.sample))
  evaluated, start = 0, time.perf_counter()
  while time.perf_counter() - start < min(seconds, 5.0):
    out = eval_fn(state, device_batches[evaluated % len(device_batches)])
    evaluated += 1
  jax.block_until_ready(out)
  eval_rate = evaluated * batch_size / (time.perf_counter() - start)

  return {"impl": "mian_jax", "model": model_name, "batch_size": batch_size, "vocab": vocab,
          "optimizer": optimizer, "devices": jax.device_count(),
          "max_steps_in_flight": step_fn.limit if isinstance(step_fn, steps.BoundedStep) else 0,
          "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
          "train_samples_per_s": train_rate, "eval_samples_per_s": eval_rate,
          "input_samples_per_s": input_rate, "input_share_of_step": train_rate / input_rate,
          "compile_s": compile_s,
          "mesh": dict(mesh.shape), "state_mb_per_device": state_bytes_per_device(state) / 2**20,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def state_bytes_per_device(state) -> int:
  """Bytes of the train state (parameters and optimiser state) held by the first device."""
  import jax  # noqa: PLC0415
  device = jax.devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == device)


def run_ours(model: str, batch: int, args: types.SimpleNamespace, data_dir: str = "") -> dict:
  """`measure` in a child process (so that peak RSS is the pair's own)."""
  command = [sys.executable, "-m", "benchmarks.throughput", f"--single={model},{batch}",
             f"--vocab={args.vocab}", f"--seconds={args.seconds}",
             f"--optimizer={args.optimizer}"]
  if args.max_steps_in_flight is not None:
    command.append(f"--max_steps_in_flight={args.max_steps_in_flight}")
  if data_dir:
    command.append(f"--data_dir={data_dir}")
  result = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"error: {model} at batch {batch} failed:\n{result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the peer


def peer_request(config, schema, columns, data_dir: str, seconds: float, threads: int,
                 l2_mode: str = "matched", seed: int = 0) -> dict:
  """The request of benchmarks/deepctr_peer.py's "throughput" mode for `config`'s model.

  Args:
    config: the config of our side (`common.make_config`): model, batch size, hyper-parameters.
    schema, columns: the data (`common.make_data`); `data_dir` holds them (`write_shared_data`).
    seconds: steady-state training time; evaluation runs min(seconds, 5).
    threads: torch.set_num_threads of the peer.
    l2_mode: compare_deepctr's --peer_l2.
    seed: the seed of the batches (ours use 0) and of the peer's initialisation.

  Returns:
    A JSON-able dict: mode, model, seed, data_dir, spec (compare_deepctr.feature_column_spec),
    seconds, eval_seconds, threads, dense_init ("deepctr": its own), hparams (as
    compare_deepctr.py passes them, L2 included).
  """
  m, t = config.model, config.train
  lookups = compare_deepctr.lookups_per_example(schema, np.asarray(columns["hist_len"]))
  l2 = compare_deepctr.peer_l2(l2_mode, t.l2_weight, t.l2_scope, t.batch_size, lookups,
                               compare_deepctr.table_rows(schema))
  return {
      "mode": "throughput", "model": m.name, "seed": seed, "data_dir": data_dir,
      "spec": compare_deepctr.feature_column_spec(schema, m.sequence_pooling),
      "seconds": seconds, "eval_seconds": min(seconds, 5.0), "threads": threads,
      "dense_init": "deepctr", "hparams": common.peer_hparams(config, l2),
  }


# ----------------------------------------------------------------------------- results


def median_row(runs: list[dict]) -> dict:
  """The first run's row with each measurement replaced by its median over `runs` (the values
  of every run kept under "<key>_runs" when there are several)."""
  row = dict(runs[0])
  for key in METRICS:
    if key in row:
      values = [r[key] for r in runs]
      row[key] = statistics.median(values)
      if len(runs) > 1:
        row[key + "_runs"] = values
  row["repeats"] = len(runs)
  return row


def add_ratios(ours: dict, theirs: dict) -> None:
  """Puts ours / theirs train and eval samples/s into our row."""
  ours["ratio_train_vs_peer"] = ours["train_samples_per_s"] / theirs["train_samples_per_s"]
  ours["ratio_eval_vs_peer"] = ours["eval_samples_per_s"] / theirs["eval_samples_per_s"]


def format_row(row: dict, label: str = "") -> str:
  """One table line of a measured row (input "-" where not measured)."""
  input_rate = row.get("input_samples_per_s")
  input_text = f"{input_rate:>9.0f}/s" if input_rate is not None else f"{'-':>9}  "
  line = (f"{row['model']:>10} batch {row['batch_size']:>5}: "
          f"train {row['train_samples_per_s']:>9.0f}/s  eval {row['eval_samples_per_s']:>9.0f}/s"
          f"  input {input_text}  compile {row['compile_s']:5.1f}s"
          f"  peak RSS {row['peak_rss_mb']:6.0f} MB")
  return f"{line}  {label}" if label else line


def format_summary(rows: list[dict]) -> str:
  """Per (model, batch size): both implementations' samples/s and ours / theirs."""
  header = (f"{'model':>10} {'batch':>6} {'train ours/s':>13} {'theirs/s':>10} {'ratio':>7} "
            f"{'eval ours/s':>12} {'theirs/s':>10} {'ratio':>7} {'compile s ours/theirs':>22}")
  lines = [header, "-" * len(header)]
  for ours in (r for r in rows if r["impl"] == "mian_jax"):
    theirs = next((r for r in rows if r["impl"] == "deepctr_torch"
                   and (r["model"], r["batch_size"]) == (ours["model"], ours["batch_size"])),
                  None)
    if theirs is None:
      lines.append(f"{ours['model']:>10} {ours['batch_size']:>6} "
                   f"{ours['train_samples_per_s']:>13.0f} {'-':>10} {'-':>7} "
                   f"{ours['eval_samples_per_s']:>12.0f} {'-':>10} {'-':>7} "
                   f"{ours['compile_s']:>12.2f} / -")
      continue
    lines.append(f"{ours['model']:>10} {ours['batch_size']:>6} "
                 f"{ours['train_samples_per_s']:>13.0f} {theirs['train_samples_per_s']:>10.0f} "
                 f"{ours['ratio_train_vs_peer']:>6.2f}x "
                 f"{ours['eval_samples_per_s']:>12.0f} {theirs['eval_samples_per_s']:>10.0f} "
                 f"{ours['ratio_eval_vs_peer']:>6.2f}x "
                 f"{ours['compile_s']:>12.2f} / {theirs['compile_s']:.2f}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def define_flags(fv: flags.FlagValues) -> None:
  string = functools.partial(flags.DEFINE_string, flag_values=fv)
  string("models", "mian,din", "comma-separated models")
  string("batch_sizes", "128,1024", "comma-separated batch sizes")
  flags.DEFINE_enum("vocab", "electronics", sorted(common.VOCABS), "vocabulary sizes",
                    flag_values=fv)
  flags.DEFINE_float("seconds", 20.0, "steady-state time per pair", flag_values=fv)
  flags.DEFINE_enum("optimizer", "adam", list(common.OPTIMIZERS),
                    "config.train.optimizer of our models", flag_values=fv)
  flags.DEFINE_integer("max_steps_in_flight", None, "unfinished train steps allowed "
                       "(steps.bound_in_flight); 0: unbounded; default: 8 on several CPU devices "
                       "(an XLA:CPU deadlock, docs/performance.md), else unbounded",
                       flag_values=fv)
  string("out", "runs/throughput.jsonl", "JSONL file rows are appended to")
  flags.DEFINE_bool("peer", False, "also measure DeepCTR-Torch's DIN / DeepFM, alternating "
                    "with ours", flag_values=fv)
  flags.DEFINE_integer("repeats", 1, "runs per implementation and pair (alternating); medians "
                       "reported", lower_bound=1, flag_values=fv)
  common.define_peer_flags(fv)
  string("single", "", "internal: model,batch of a child measuring one pair")
  string("data_dir", "", "internal: the child's shared arrays")


def parse_args(argv=None) -> types.SimpleNamespace:
  return common.parse_flags(argv, __doc__, define_flags)


def measure_pair(model: str, batch: int, args, data: dict | None) -> list[dict]:
  """Ours (and, with `data`, theirs) alternately, --repeats times; the median rows."""
  runs: dict[str, list[dict]] = {"mian_jax": [], "deepctr_torch": []}
  for repeat in range(args.repeats):
    label = f"run {repeat + 1}/{args.repeats}" if args.repeats > 1 else ""
    runs["mian_jax"].append(run_ours(model, batch, args, data["dir"] if data else ""))
    if args.repeats > 1:
      print(format_row(runs["mian_jax"][-1], f"mian_jax {label}"), flush=True)
    if data:
      request = peer_request(common.make_config(model, batch, args.optimizer), data["schema"],
                             data["columns"], data["dir"], args.seconds, data["threads"])
      try:
        runs["deepctr_torch"].append(common.run_peer(request, args.peer_python,
                                                     timeout=600 + 3 * args.seconds))
      except (RuntimeError, subprocess.TimeoutExpired) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
      runs["deepctr_torch"][-1]["vocab"] = args.vocab
      if args.repeats > 1:
        print(format_row(runs["deepctr_torch"][-1], f"deepctr_torch {label}"), flush=True)
  rows = [median_row(runs[impl]) for impl in runs if runs[impl]]
  if len(rows) == 2:
    add_ratios(*rows)
  return rows


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.single:
    model, batch = args.single.split(",")
    print(json.dumps(measure(model, int(batch), args.vocab, args.seconds, args.optimizer,
                             args.data_dir, args.max_steps_in_flight)))
    return
  if args.peer:
    common.check_peer_python(args.peer_python)
  tmp = tempfile.mkdtemp(prefix="throughput-") if args.peer else ""
  try:
    data = None
    if args.peer:
      schema, columns = common.make_data(args.vocab)
      data = {"dir": os.path.join(tmp, "data"), "schema": schema, "columns": columns,
              "threads": args.peer_threads or os.cpu_count() or 1}
      write_shared_data(data["dir"], schema, columns)
      print(f"data: vocab {args.vocab!r}, {schema.size('train')} rows in {data['dir']} "
            f"(read by both); ours: optimizer {args.optimizer!r}; peer: {args.peer_python}, "
            f"torch.set_num_threads({data['threads']}), torch.set_flush_denormal(True), "
            f"torch.optim.Adam, L2 'matched'; {args.repeats} run(s) each, alternating",
            flush=True)
    rows = []
    for model in args.models.split(","):
      if args.peer and model not in PEER_MODELS:
        print(f"note: DeepCTR-Torch has no {model!r} (only {', '.join(PEER_MODELS)}): "
              "measuring mian_jax only", flush=True)
      for batch in args.batch_sizes.split(","):
        pair = measure_pair(model, int(batch), args,
                            data if args.peer and model in PEER_MODELS else None)
        for row in pair:
          rows.append(row)
          common.append_jsonl(args.out, [row])
          label = row["impl"] + (" median" if args.repeats > 1 else "")
          print(format_row(row, label if args.peer else ""), flush=True)
    if args.peer:
      print()
      print(format_summary(rows))
      print("ratio: mian_jax / deepctr_torch samples/s; compile s of deepctr_torch = its first "
            f"step. Results appended to {args.out}")
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
