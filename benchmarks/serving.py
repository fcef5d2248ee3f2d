"""Serving speed: latency at batch 1 and throughput at batch 1024 of an exported model
(`mian_jax.serving.Scorer.score`) against the in-process jitted eval step, on the same rows.

  python -m benchmarks.serving --config=configs/synthetic.py --models=mian,din \\
      --out=runs/serving.jsonl [--seconds=10] [--batch_sizes=1,1024] [--rounds=4] \\
      [--config.data.synthetic.num_train=20000 --config.x=y ...]

For each model of --models, the config's data is prepared (or found) and `steps.setup` builds
the model and a freshly initialised state: nothing is trained, since the values of the
parameters change the scores but not the time it takes to compute them. The state is exported
with `export.export_run` (for this process's platform) into a temporary directory and loaded
with `Scorer.load`, as a serving process would. Both implementations then score the same rows of
the valid split (a row index past the end wraps around, so a batch may hold a row twice):

- exported_scorer: `Scorer.score(batch)`. It checks and casts the inputs against
  signature.json, pads the batch to a power of two (1 and 1024 need no padding), calls the
  deserialised StableHLO and returns NumPy arrays: the probabilities and each attention
  module's weights.
- eval_step: `run.eval_step(state, sharding.to_global(batch, mesh))`, the step evaluation
  uses, with the probabilities copied back to the host (`jax.device_get`). It returns no
  attention weights.

Both run on one device (the mesh of `steps.setup` is built over the first device only): the
scorer places its parameters on one device, and a batch of one row cannot be split. A timed
call starts with the batch as NumPy arrays on the host and ends with the scores on the host;
building the batch from the split is not timed. Each implementation is called `WARMUP_CALLS`
times first (compilation included; the first call's time is `first_call_s`), then timed call by
call for --seconds per batch size, in --rounds rounds that alternate the two implementations
so that a change of load hits both alike. Reported per (model, implementation, batch size):
latency p50 / p99 / mean in ms over the timed calls, and rows/s = rows scored / time spent in
the calls. Each row records the versions, the device and the load average (`os.getloadavg()`)
before and after its measurement. The scorer's rows also hold the largest absolute difference
of its probabilities from the eval step's on the same rows (a check that both compute the same
scores).

With --peer, for a model DeepCTR-Torch has (DIN, DeepFM), benchmarks/deepctr_peer.py in mode
"predict" (run by --peer_python, a separate venv with torch and deepctr-torch; see
compare_deepctr.py) builds DeepCTR-Torch's model with the same hyper-parameters and feature
columns (as throughput.py --peer does; freshly initialised too) and times, on the same rows of
the valid split and with the same warm-up, seconds and rounds, two calls: its own
`model.predict(features, batch_size=B)` ("deepctr_torch_predict") and the bare forward pass
under torch.no_grad() ("deepctr_torch_forward"); see `run_predict` there. The peer runs in its
own process after ours, with torch.set_num_threads(--peer_threads, default all cores), so its
rounds cannot alternate with ours; each row records the load average around its measurement.
Without --peer such a model gets a row with "measured": false saying so.

One JSON object per row is appended to --out; a Markdown table ends the run.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from benchmarks import common, compare_deepctr

IMPLS = ("exported_scorer", "eval_step")
WARMUP_CALLS = 10  # untimed calls per (implementation, batch size) before timing
DISTINCT_BATCHES = 64  # at most this many different batches are cycled through per batch size
PEER_NOT_MEASURED = "not measured: run with --peer (and a --peer_python with deepctr-torch)"
PEER_IMPLS = ("deepctr_torch_predict", "deepctr_torch_forward")
_NOT_INPUTS = ("label", "weight")  # keys of a pipeline batch that no model reads


def percentile(values: Sequence[float], q: float) -> float:
  """The q-th percentile (0-100) of `values`, linearly interpolated (NumPy's default)."""
  return float(np.percentile(np.asarray(values, np.float64), q))


def summarise(durations: Sequence[float], batch_size: int) -> dict[str, float | int]:
  """Latency percentiles (ms) and rows/s of timed calls of `batch_size` rows each."""
  return {"latency_p50_ms": 1e3 * percentile(durations, 50),
          "latency_p99_ms": 1e3 * percentile(durations, 99),
          "latency_mean_ms": 1e3 * statistics.fmean(durations),
          "rows_per_s": batch_size * len(durations) / sum(durations),
          "calls": len(durations)}


def valid_batches(data_dir: str, schema, batch_size: int) -> list[dict]:
  """Up to DISTINCT_BATCHES consecutive batches of the valid split's rows (wrapping around),
  without label and weight, as nested NumPy batches (`pipeline.gather_batch`)."""
  from mian_jax.data import pipeline  # noqa: PLC0415
  from mian_jax.data import schema as schema_lib  # noqa: PLC0415
  columns = schema_lib.load_split(data_dir, "valid", schema)
  n = schema.size("valid")
  count = max(1, min(DISTINCT_BATCHES, n // batch_size))
  batches = []
  for k in range(count):
    batch = pipeline.gather_batch(columns, schema, (k * batch_size + np.arange(batch_size)) % n)
    batches.append({key: value for key, value in batch.items() if key not in _NOT_INPUTS})
  return batches


def time_calls(fn: Callable[[dict], Any], batches: Sequence[dict], seconds: float,
               start_index: int = 0) -> list[float]:
  """Calls `fn` on `batches` in turn (from `start_index`) for about `seconds` (at least once);
  the duration of each call in seconds."""
  durations: list[float] = []
  end = time.perf_counter() + seconds
  i = start_index
  while not durations or time.perf_counter() < end:
    batch = batches[i % len(batches)]
    start = time.perf_counter()
    fn(batch)
    durations.append(time.perf_counter() - start)
    i += 1
  return durations


def environment() -> dict[str, Any]:
  """Versions, device and machine: what a row's figures depend on besides the code."""
  import jax  # noqa: PLC0415
  import jaxlib  # noqa: PLC0415
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": device.device_kind,
          "device_count": jax.device_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__, "numpy_version": np.__version__,
          "python_version": platform.python_version()}


def measure_peer(run, config, batch_sizes: Sequence[int], seconds: float, rounds: int,
                 peer_python: str, threads: int) -> list[dict[str, Any]]:
  """DeepCTR-Torch's predict and forward pass on `run`'s valid rows (module docstring): one
  row per (call, batch size), as `measure_model`'s rows."""
  from benchmarks import throughput  # noqa: PLC0415
  train = run.split("train")
  request = throughput.peer_request(config, run.schema, train, run.data_dir, seconds, threads)
  request.update(mode="predict", batch_sizes=list(batch_sizes), rounds=rounds,
                 warmup_calls=WARMUP_CALLS, distinct_batches=DISTINCT_BATCHES)
  loadavg_start = list(os.getloadavg())
  result = common.run_peer(request, peer_python, timeout=600 + 4 * seconds * len(batch_sizes))
  loadavg_end = list(os.getloadavg())
  shared = {key: value for key, value in result.items() if key not in ("rows", "impl")}
  return [{"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "impl": f"deepctr_torch_{r['call']}", "measured": True,
           **{k: v for k, v in r.items() if k != "call"}, "loadavg_start": loadavg_start,
           "loadavg_end": loadavg_end, "trained": False, "rows_from": "valid",
           "seconds": seconds, "rounds": rounds, "warmup_calls": WARMUP_CALLS,
           "peer_threads": threads, **shared} for r in result["rows"]]


def measure_model(config, model: str, seconds: float, batch_sizes: Sequence[int] = (1, 1024),
                  rounds: int = 4, peer: tuple[str, int] | None = None) -> list[dict[str, Any]]:
  """Measures the exported scorer and the in-process eval step of `model` on `config`'s data.

  Args:
    config: a checked config (`workdir.load_config`); its model name is replaced by `model`.
    seconds: timed seconds per (implementation, batch size), split into `rounds` rounds that
      alternate the implementations.

    peer: (peer python, torch threads) to also measure DeepCTR-Torch (`measure_peer`).

  Returns:
    One row per (implementation, batch size), in the order of IMPLS within each batch size
    (module docstring); for a model DeepCTR-Torch has, its rows (with `peer`) or a
    "deepctr_torch" row with "measured": false.
  """
  import jax  # noqa: PLC0415

  from mian_jax import export, sharding, steps  # noqa: PLC0415
  from mian_jax.serving import Scorer  # noqa: PLC0415
  config = config.copy_and_resolve_references()
  config.model.name = model
  run = steps.setup(config, sharding.create_mesh(jax.devices()[:1]))
  platforms = ("cuda",) if jax.default_backend() == "gpu" else (jax.default_backend(),)
  with tempfile.TemporaryDirectory(prefix=f"serving-{model}-") as tmp:
    manifest = export.export_run(run, run.state, os.path.join(tmp, "export"), platforms)
    scorer = Scorer.load(os.path.join(tmp, "export"))
    fns = {
        "exported_scorer": lambda batch: scorer.score(batch)["prob"],
        "eval_step": lambda batch: jax.device_get(
            run.eval_step(run.state, sharding.to_global(batch, run.mesh))["prob"]),
    }
    num_parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params))
    shared = {"model": model, "trained": False, "step": manifest["step"],
              "num_parameters": num_parameters, "data_dir": run.data_dir,
              "data_checksum": run.data_checksum, "rows_from": "valid",
              "valid_rows": run.schema.size("valid"), "export_platforms": manifest["platforms"],
              "seconds": seconds, "rounds": rounds, "warmup_calls": WARMUP_CALLS,
              **environment()}
    rows = []
    for batch_size in batch_sizes:
      batches = valid_batches(run.data_dir, run.schema, batch_size)
      first_call, loadavg_start = {}, list(os.getloadavg())
      for impl, fn in fns.items():
        start = time.perf_counter()
        fn(batches[0])
        first_call[impl] = time.perf_counter() - start
        for i in range(WARMUP_CALLS - 1):
          fn(batches[(i + 1) % len(batches)])
      durations: dict[str, list[float]] = {impl: [] for impl in fns}
      for round_index in range(rounds):
        for impl in (IMPLS if round_index % 2 == 0 else IMPLS[::-1]):
          durations[impl] += time_calls(fns[impl], batches, seconds / rounds,
                                        len(durations[impl]))
      loadavg_end = list(os.getloadavg())
      difference = float(np.max(np.abs(fns["exported_scorer"](batches[0])
                                       - fns["eval_step"](batches[0]))))
      for impl in IMPLS:
        row = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "impl": impl, "batch_size": batch_size, "measured": True,
               **summarise(durations[impl], batch_size), "first_call_s": first_call[impl],
               "distinct_batches": len(batches), "loadavg_start": loadavg_start,
               "loadavg_end": loadavg_end, **shared}
        if impl == "exported_scorer":
          row["max_abs_diff_vs_eval_step"] = difference
        rows.append(row)
    if model in compare_deepctr.MODELS and peer is not None:
      rows += measure_peer(run, config, batch_sizes, seconds, rounds, *peer)
  if model in compare_deepctr.MODELS and peer is None:
    rows.append({"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "impl": "deepctr_torch", "model": model, "batch_sizes": list(batch_sizes),
                 "measured": False, "reason": PEER_NOT_MEASURED,
                 "peer_python_found": os.access(common.DEFAULT_PEER_PYTHON, os.X_OK)})
  return rows


IMPL_NAMES = {"exported_scorer": "exported (`Scorer.score`)",
              "eval_step": "in-process `eval_step`", "deepctr_torch": "DeepCTR-Torch",
              "deepctr_torch_predict": "DeepCTR-Torch `model.predict`",
              "deepctr_torch_forward": "DeepCTR-Torch forward (`no_grad`)"}


def format_table(rows: Sequence[dict]) -> str:
  """The rows as a Markdown table, one line per (model, implementation, batch size)."""
  lines = ["| model | implementation | batch | p50 ms | p99 ms | rows/s | calls | load avg |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if not r.get("measured"):
      lines.append(f"| {r['model']} | {IMPL_NAMES[r['impl']]} | - | not measured | | | | |")
      continue
    load = f"{r['loadavg_start'][0]:.1f} → {r['loadavg_end'][0]:.1f}"
    lines.append(f"| {r['model']} | {IMPL_NAMES[r['impl']]} | {r['batch_size']} | "
                 f"{r['latency_p50_ms']:.3f} | {r['latency_p99_ms']:.3f} | "
                 f"{r['rows_per_s']:,.0f} | {r['calls']:,} | {load} |")
  return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
  """The flags; `--config.<key>=<value>` overrides (repeatable) may come anywhere."""
  common.define_config_flag(fv)
  flags.DEFINE_string("models", "mian,din", "comma list of models", flag_values=fv)
  flags.DEFINE_string("out", "runs/serving.jsonl", "JSONL file rows are appended to",
                      flag_values=fv)
  flags.DEFINE_float("seconds", 10.0, "timed seconds per (model, implementation, batch size)",
                     flag_values=fv)
  flags.DEFINE_string("batch_sizes", "1,1024", "comma list of batch sizes", flag_values=fv)
  flags.DEFINE_integer("rounds", 4, "rounds alternating the two implementations per batch size",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("peer", False, "also measure DeepCTR-Torch's predict (DIN, DeepFM) with "
                    "--peer_python", flag_values=fv)
  common.define_peer_flags(fv)


def parse_args(argv=None) -> types.SimpleNamespace:
  args = common.parse_flags(argv, __doc__, define_flags, config_overrides=True)
  sizes = [x for x in args.batch_sizes.split(",") if x]
  if not sizes or not all(x.isdigit() and int(x) > 0 for x in sizes):
    common.usage_error(f"--batch_sizes={args.batch_sizes!r}: expected positive integers")
  if args.seconds <= 0:
    common.usage_error("--seconds must be positive")
  args.batch_sizes = [int(x) for x in sizes]
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  from mian_jax import workdir  # noqa: PLC0415
  try:
    config = workdir.load_config(args.config, args.overrides)
  except ValueError as e:
    sys.exit(f"error: {e}")
  from mian_jax import cli, models  # noqa: PLC0415
  from mian_jax.errors import MianError  # noqa: PLC0415
  names = [x for x in args.models.split(",") if x]
  unknown = sorted(set(names) - set(models.MODELS))
  if unknown:
    sys.exit(f"error: unknown model(s) {unknown}; expected some of {sorted(models.MODELS)}")
  if args.peer:
    common.check_peer_python(args.peer_python)
  peer = (args.peer_python, args.peer_threads or os.cpu_count() or 1) if args.peer else None
  cli.quiet_library_logs()
  env = environment()
  print(f"{env['backend']} ({env['device']}, {env['cpu']}, {env['cpu_count']} cores), jax "
        f"{env['jax_version']}; load average {os.getloadavg()[0]:.2f}", flush=True)
  rows = []
  for name in names:
    try:
      measured = measure_model(config, name, args.seconds, args.batch_sizes, args.rounds, peer)
    except MianError as e:
      sys.exit(f"error: {' '.join(str(e).split())}")
    for row in measured:
      row.update(config=args.config, overrides=args.overrides)
    common.append_jsonl(args.out, measured)
    rows += measured
    for row in measured:
      if row["measured"]:
        print(f"{name} {row['impl']} batch {row['batch_size']}: p50 "
              f"{row['latency_p50_ms']:.3f} ms, p99 {row['latency_p99_ms']:.3f} ms, "
              f"{row['rows_per_s']:,.0f} rows/s", flush=True)
  print()
  print(format_table(rows))
  peer_text = "" if peer else f" DeepCTR-Torch {PEER_NOT_MEASURED}."
  print(f"\nuntrained (freshly initialised) models: parameter values do not change the speed."
        f"{peer_text} Rows appended to {args.out}")


if __name__ == "__main__":
  main()
