"""A/B of config variants of one model's train step, in one process, in alternating rounds.

  python benchmarks/ab_step.py --model=mian --batch_size=128 --vocab=electronics \
      --variant="hash:" --variant="threefry:model.dropout_rng=threefry" \
      [--variant="no dropout:model.dropout_rate=0.0"] [--rounds=5] [--steps=40] [--out=FILE]

Each --variant is "name:key=value;key=value" (config keys of mian_jax/config_defaults.py's base
config, as throughput.py builds it; values are Python literals or plain strings; "name:" is the
base config). Every variant's train step is built and compiled first; then `--rounds` rounds time
`--steps` steps of each variant in turn, on the same packed batches already on the device.
On a shared machine whose speed drifts, alternating rounds keep the comparison fair where
separate runs would not (docs/performance.md). Prints per variant the median, min and max
samples/s and the median's ratio to the first variant's; appends one JSON object per variant to
--out. Pin the process to one core (`taskset -c 0`) for the most repeatable rounds.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
  """ "name:key=value;key=value" -> (name, {key: value}); values via ast.literal_eval, else str."""
  name, sep, rest = text.partition(":")
  if not sep or not name:
    raise ValueError(f"--variant {text!r}: expected 'name:key=value;...' (or 'name:')")
  overrides = {}
  for item in filter(None, rest.split(";")):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"--variant {text!r}: {item!r} is not key=value")
    try:
      overrides[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key.strip()] = value
  return name, overrides


def variant_config(model: str, batch_size: int, optimizer: str, overrides: dict[str, object]):
  """throughput.make_config's config with `overrides` applied by ml_collections (locked, so an
  unknown key is an error; values must have the field's type); the result passes config_checks."""
  from mian_jax import config_checks  # noqa: PLC0415
  config = throughput.make_config(model, batch_size, optimizer)
  config.lock()
  for key, value in overrides.items():
    try:
      config.update_from_flattened_dict({key: value})
    except KeyError:
      raise ValueError(f"unknown config key {key!r}") from None
    except TypeError as e:
      raise ValueError(f"{key}={value!r}: {e}") from None
  config_checks.check_config(config)
  return config


def run(model: str, batch_size: int, vocab: str, optimizer: str,
        variants: list[tuple[str, dict]], rounds: int, num_steps: int) -> list[dict]:
  """Builds every variant, then times them in alternating rounds; one row per variant."""
  import jax  # noqa: PLC0415
  from mian_jax import models, optim, sharding, steps  # noqa: PLC0415
  from mian_jax.data import pipeline  # noqa: PLC0415

  schema, columns = throughput.make_data(vocab, num_examples=max(16 * batch_size, 4096))
  mesh = sharding.create_mesh()
  batches = pipeline.TrainBatches(columns, schema, batch_size, seed=0)
  packed = [sharding.pack_to_global(batches.batch(s), mesh) for s in range(8)]
  sample = sharding.to_global(batches.batch(0), mesh)
  built = []
  for name, overrides in variants:
    config = variant_config(model, batch_size, optimizer, overrides)
    state = steps.create_train_state(models.create_model(config.model, schema.features),
                                     optim.create_optimizer(config.train), sample,
                                     jax.random.PRNGKey(0), mesh)
    step = steps.make_train_step(config.train, mesh)
    state, metrics = step(state, packed[0], jax.random.PRNGKey(1))  # compile
    jax.block_until_ready(metrics)
    built.append([name, overrides, step, state, []])
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
           "variant": name, "overrides": {k: repr(v) for k, v in overrides.items()},
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="mian")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--vocab", default="electronics", choices=sorted(throughput.VOCABS))
  parser.add_argument("--optimizer", default="lazy_adam", choices=throughput.OPTIMIZERS)
  parser.add_argument("--variant", action="append", required=True,
                      help="name:key=value;key=value (repeat; the first is the reference)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=40, help="steps per variant per round")
  parser.add_argument("--out", default="", help="append one JSON object per variant")
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.steps < 1:
    parser.error("--rounds and --steps must be at least 1")
  try:
    variants = [parse_variant(v) for v in args.variant]
    for _, overrides in variants:  # fail before any compilation
      variant_config(args.model, args.batch_size, args.optimizer, overrides)
  except ValueError as e:  # also ConfigError, a ValueError
    sys.exit(f"error: {e}")
  if len({name for name, _ in variants}) != len(variants):
    sys.exit("error: variant names must be distinct")
  rows = run(args.model, args.batch_size, args.vocab, args.optimizer, variants, args.rounds,
             args.steps)
  print(f"{args.model}, batch {args.batch_size}, {args.vocab}, {args.optimizer}: train "
        f"samples/s over {args.rounds} alternating rounds of {args.steps} steps")
  print(format_table(rows))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
