"""Where a train step's time goes, by model module: the JAX profiler, grouped by source.

  python -m benchmarks.profile_step --model=mian --batch_size=128 --optimizer=lazy_adam \\
      [--vocab=electronics] [--depth=4] [--steps=20] [--trace_dir=/tmp/profile]

Runs the train step of benchmarks/common.py's data and config, records `--steps` steps
with `jax.profiler.trace` (a Perfetto trace, also viewable in TensorBoard / Perfetto UI), and
sums the device time of every XLA operation of the step by the Flax module that emitted it
(the op's `op_name` metadata, cut to `--depth` path components: e.g.
"jvp(MIAN)/MIAN._ibim/transformer/attention" is the forward pass of IBIM's attention, and
"transpose(jvp(MIAN))/..." its backward pass). Prints the top groups in ms per step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import flags

from benchmarks import common

_OP_NAME = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"")


def op_sources(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: its op_name metadata} of a compiled module's text."""
  sources = {}
  for line in hlo_text.splitlines():
    match = _OP_NAME.match(line)
    if match:
      sources.setdefault(match.group(1), match.group(2))
  return sources


def group_name(op_name: str, depth: int) -> str:
  """The first `depth` components of an op_name, without the jit(...) prefix."""
  parts = [p for p in op_name.split("/") if not p.startswith("jit(train_step)")]
  return "/".join(parts[:depth]) or "(top level)"


def op_times(trace_file: str, module: str) -> collections.Counter:
  """{HLO op: total microseconds} over the trace's events of compiled module `module`."""
  with gzip.open(trace_file) as f:
    events = json.load(f)["traceEvents"]
  times = collections.Counter()
  for e in events:
    args = e.get("args", {})
    if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
      times[args["hlo_op"]] += e.get("dur", 0)
  return times


def profile(model: str, batch_size: int, optimizer: str, vocab: str, num_steps: int,
            trace_dir: str) -> tuple[float, dict[str, str], collections.Counter]:
  """(wall ms per step, `op_sources` of the step, {HLO op: device µs} over `steps` steps)."""
  import jax  # noqa: PLC0415

  from mian_jax import sharding  # noqa: PLC0415
  schema, columns = common.make_data(vocab, num_examples=max(16 * batch_size, 4096))
  setup = common.setup_arrays(common.make_config(model, batch_size, optimizer), schema, columns)
  device_batches = [sharding.to_global(setup.batches.batch(s), setup.mesh) for s in range(8)]
  state, step_fn = setup.state, setup.train_step
  rng = jax.random.PRNGKey(1)
  sources = op_sources(step_fn.lower(state, device_batches[0], rng).compile().as_text())
  for i in range(5):  # compile and warm up
    state, metrics = step_fn(state, device_batches[i % 8], rng)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(num_steps):
      state, metrics = step_fn(state, device_batches[i % 8], rng)
    jax.block_until_ready(metrics)
  wall_ms = (time.perf_counter() - start) / num_steps * 1e3
  trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not trace:
    sys.exit(f"error: the profiler wrote no trace under {trace_dir}")
  return wall_ms, sources, op_times(trace[-1], "jit_train_step")


def define_flags(fv: flags.FlagValues) -> None:
  common.define_model_flags(fv, "mian", 128, "lazy_adam", "electronics")
  flags.DEFINE_integer("steps", 20, "steps traced", flag_values=fv)
  flags.DEFINE_integer("depth", 4, "op_name components per group", flag_values=fv)
  flags.DEFINE_integer("top", 25, "groups printed", flag_values=fv)
  flags.DEFINE_string("trace_dir", "", "default: a new temporary directory", flag_values=fv)


def main(argv=None) -> None:
  args = common.parse_flags(argv, __doc__, define_flags)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile-step-")
  wall_ms, sources, times = profile(args.model, args.batch_size, args.optimizer, args.vocab,
                                    args.steps, trace_dir)
  groups = collections.Counter()
  for op, us in times.items():
    groups[group_name(sources.get(op, "(no metadata)"), args.depth)] += us / args.steps / 1e3
  total = sum(groups.values())
  print(f"{args.model}, batch {args.batch_size}, {args.optimizer}, {args.vocab}: "
        f"{wall_ms:.2f} ms per step wall; {total:.2f} ms of XLA ops per step "
        f"(ops of one step can overlap on several threads). Trace: {trace_dir}")
  print(f"{'ms/step':>8} {'share':>6}  module")
  for name, ms in groups.most_common(args.top):
    print(f"{ms:8.2f} {ms / total:6.1%}  {name}")


if __name__ == "__main__":
  main()
