"""A/B of config variants of one model's train step, in one process, in alternating rounds.

  python -m benchmarks.ab_step --model=mian --batch_size=128 --vocab=electronics \\
      --variant=hash --variant="threefry: --config.model.dropout_rng=threefry" \\
      [--variant="no dropout: --config.model.dropout_rate=0.0"] [--rounds=5] [--steps=40] \\
      [--out=FILE]

Each --variant is a name, then optionally a colon and the variant's config overrides, in the
`--config.<key>=<value>` form of `python -m mian_jax.main` (several separated by spaces, quoted
as in a shell): "name" alone is the base config, mian_jax/config_defaults.py's base config with
--model, --batch_size and --optimizer (benchmarks/common.py's `make_config`). The first variant
is the reference. Every variant's train step is built and compiled first; then `--rounds`
rounds time `--steps` steps of each variant in turn, on the same packed batches already on the
device. On a shared machine whose speed drifts, alternating rounds keep the comparison fair
where separate runs would not (docs/performance.md). Prints per variant the median, min and max
samples/s and the median's ratio to the first variant's; appends one JSON object per variant to
--out. Pin the process to one core (`taskset -c 0`) for the most repeatable rounds.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time

from absl import flags

from benchmarks import common


def parse_variant(text: str) -> tuple[str, list[str]]:
  """ "name: --config.a=1 --config.b=x" -> ("name", ["--config.a=1", "--config.b=x"])."""
  name, _, flags = text.partition(":")
  if not name.strip():
    raise ValueError(f"--variant={text!r}: expected 'name' or 'name: --config.<key>=<value> ...'")
  return name.strip(), shlex.split(flags)


def variant_config(model: str, batch_size: int, optimizer: str, overrides: list[str]):
  """common.make_config's config with a variant's --config.* overrides (workdir.load_config:
  an unknown key or a bad value is a ValueError); the result passes config_checks."""
  from mian_jax import workdir  # noqa: PLC0415
  return workdir.load_config(common.make_config(model, batch_size, optimizer), overrides)


def run(model: str, batch_size: int, vocab: str, optimizer: str,
        variants: list[tuple[str, list[str]]], rounds: int, num_steps: int) -> list[dict]:
  """Builds every variant, then times them in alternating rounds; one row per variant."""
  import jax  # noqa: PLC0415

  from mian_jax import sharding  # noqa: PLC0415

  schema, columns = common.make_data(vocab, num_examples=max(16 * batch_size, 4096))
  mesh = sharding.create_mesh()
  built, packed = [], None
  for name, overrides in variants:
    config = variant_config(model, batch_size, optimizer, overrides)
    setup = common.setup_arrays(config, schema, columns, mesh)
    if packed is None:  # every variant takes the same batches
      packed = [sharding.pack_to_global(setup.batches.batch(s), mesh) for s in range(8)]
    state, metrics = setup.train_step(setup.state, packed[0], jax.random.PRNGKey(1))  # compile
    jax.block_until_ready(metrics)
    built.append([name, overrides, setup.train_step, state, []])
  for _ in range(rounds):
    for entry in built:
      _, _, step, state, rates = entry
      start = time.perf_counter()
      for i in range(num_steps):
        state, metrics = step(state, packed[i % len(packed)], jax.random.PRNGKey(i))
      jax.block_until_ready(metrics)
      rates.append(num_steps * batch_size / (time.perf_counter() - start))
      entry[3] = state
  base = statistics.median(built[0][4])
  return [{"model": model, "batch_size": batch_size, "vocab": vocab, "optimizer": optimizer,
           "variant": name, "overrides": overrides,
           "train_samples_per_s": statistics.median(rates), "min": min(rates),
           "max": max(rates), "rounds": [round(r) for r in rates],
           "ratio_to_first": statistics.median(rates) / base, "devices": jax.device_count(),
           "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
          for name, overrides, _, _, rates in built]


def format_table(rows: list[dict]) -> str:
  lines = [f"{'variant':>20} {'median/s':>10} {'min':>9} {'max':>9} {'ratio':>7}"]
  for r in rows:
    lines.append(f"{r['variant']:>20} {r['train_samples_per_s']:10.0f} {r['min']:9.0f} "
                 f"{r['max']:9.0f} {r['ratio_to_first']:6.2f}x")
  return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
  common.define_model_flags(fv, "mian", 128, "lazy_adam", "electronics")
  flags.DEFINE_multi_string("variant", None, "'name' or 'name: --config.<key>=<value> ...' "
                            "(repeat; the first is the reference)", flag_values=fv)
  flags.mark_flag_as_required("variant", flag_values=fv)
  flags.DEFINE_integer("rounds", 5, "alternating rounds", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("steps", 40, "steps per variant per round", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_string("out", "", "append one JSON object per variant", flag_values=fv)


def main(argv=None) -> None:
  args = common.parse_flags(argv, __doc__, define_flags)
  try:
    variants = [parse_variant(v) for v in args.variant]
    for name, overrides in variants:  # fail before any compilation
      try:
        variant_config(args.model, args.batch_size, args.optimizer, overrides)
      except ValueError as e:
        raise ValueError(f"variant {name!r}: {e}") from None
  except ValueError as e:
    sys.exit(f"error: {e}")
  if len({name for name, _ in variants}) != len(variants):
    sys.exit("error: variant names must be distinct")
  rows = run(args.model, args.batch_size, args.vocab, args.optimizer, variants, args.rounds,
             args.steps)
  print(f"{args.model}, batch {args.batch_size}, {args.vocab}, {args.optimizer}: train "
        f"samples/s over {args.rounds} alternating rounds of {args.steps} steps")
  print(format_table(rows))
  if args.out:
    common.append_jsonl(args.out, rows)


if __name__ == "__main__":
  main()
