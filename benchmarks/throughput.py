"""Training and evaluation throughput of our models on Amazon-sized vocabularies (synthetic ids).

  python benchmarks/throughput.py --models=mian,din --batch_sizes=128,1024 \
      --vocab=electronics --out=runs/throughput.jsonl

Each (model, batch size) runs in its own process, so peak RSS is that pair's own. Measured:
- compile_s: the first train step (trace, lower, compile, run);
- train_samples_per_s: steady state, after compilation, over `--seconds` of train steps on
  batches already on the device (the model step alone);
- input_samples_per_s: the host input loop alone (gather a batch from the arrays and hand it to
  the device), i.e. what the pipeline could feed; its share of a step is reported too;
- eval_samples_per_s: the jitted forward pass;
- peak_rss_mb: the process's peak resident memory.
Results print as a table and append one JSON object per pair to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (items, categories, users): Amazon 5-core sizes of Table 1 of the paper.
VOCABS = {"electronics": (63_001, 801, 192_403), "books": (367_982, 1_600, 603_668)}
NUM_EXAMPLES = 65_536  # rows of the synthetic arrays batches are drawn from
MAX_SEQ_LEN = 30


def make_data(vocab: str, seed: int = 0):
  """Random prepared-format columns with Amazon-sized vocabularies; returns (schema, columns)."""
  sys.path.insert(0, REPO)
  from mian_jax.data import schema as schema_lib  # noqa: PLC0415
  items, categories, users = VOCABS[vocab]
  reserved = schema_lib.NUM_RESERVED_IDS
  cat = lambda name, n: schema_lib.Field(name, "categorical", n + reserved)  # noqa: E731
  features = schema_lib.FeatureSpec(
      item_fields=(cat("item_id", items), cat("category", categories)),
      behavior_fields=("item_id", "category"),
      user_fields=(cat("user_id", users), cat("activity", 8)),
      context_fields=(cat("month", 12), cat("weekday", 7), cat("gap", 6)),
      max_seq_len=MAX_SEQ_LEN)
  n = NUM_EXAMPLES
  schema = schema_lib.Schema(features, (("train", n), ("valid", n), ("test", n)))
  rng = np.random.default_rng(seed)
  ids = lambda size, shape: (rng.integers(0, size, shape) + reserved).astype(np.int32)  # noqa
  lengths = rng.integers(1, MAX_SEQ_LEN + 1, n).astype(np.int32)
  valid = np.arange(MAX_SEQ_LEN)[None] < lengths[:, None]
  columns = {"item.item_id": ids(items, n), "item.category": ids(categories, n),
             "hist.item_id": np.where(valid, ids(items, (n, MAX_SEQ_LEN)), 0).astype(np.int32),
             "hist.category": np.where(valid, ids(categories, (n, MAX_SEQ_LEN)), 0
                                       ).astype(np.int32),
             "hist_len": lengths, "user.user_id": ids(users, n), "user.activity": ids(8, n),
             "context.month": ids(12, n), "context.weekday": ids(7, n), "context.gap": ids(6, n),
             "label": rng.integers(0, 2, n).astype(np.float32),
             "group_id": rng.integers(0, users, n).astype(np.int64)}
  schema_lib.validate_columns(schema, "train", columns)
  return schema, columns


def measure(model_name: str, batch_size: int, vocab: str, seconds: float) -> dict:
  """Measures one (model, batch size) pair in this process."""
  sys.path.insert(0, REPO)
  import jax  # noqa: PLC0415
  from configs import common  # noqa: PLC0415
  from mian_jax import models, train  # noqa: PLC0415
  from mian_jax.data import pipeline  # noqa: PLC0415

  schema, columns = make_data(vocab)
  config = common.get_base_config()
  config.model.name = model_name
  config.train.batch_size = batch_size
  mesh = train.create_mesh()
  model = models.create_model(config.model, schema.features)
  batches = pipeline.TrainBatches(columns, schema, batch_size, seed=0)
  sample = train.to_global(batches.batch(0), mesh)
  state = train.create_train_state(model, train.create_optimizer(config.train), sample,
                                   jax.random.PRNGKey(0), mesh)
  step_fn = train.make_train_step(config.train, mesh)
  rng = jax.random.PRNGKey(1)

  start = time.perf_counter()
  state, metrics = step_fn(state, sample, rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start

  device_batches = [train.to_global(batches.batch(s), mesh) for s in range(1, 9)]
  steps, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    state, metrics = step_fn(state, device_batches[steps % len(device_batches)], rng)
    steps += 1
  jax.block_until_ready(metrics)
  train_rate = steps * batch_size / (time.perf_counter() - start)

  fed, start = 0, time.perf_counter()
  while time.perf_counter() - start < min(seconds, 5.0):
    jax.block_until_ready(train.to_global(batches.batch(fed), mesh))
    fed += 1
  input_rate = fed * batch_size / (time.perf_counter() - start)

  eval_fn = train.make_eval_step(mesh)
  jax.block_until_ready(eval_fn(state, sample))
  evaluated, start = 0, time.perf_counter()
  while time.perf_counter() - start < min(seconds, 5.0):
    out = eval_fn(state, device_batches[evaluated % len(device_batches)])
    evaluated += 1
  jax.block_until_ready(out)
  eval_rate = evaluated * batch_size / (time.perf_counter() - start)

  return {"impl": "mian_jax", "model": model_name, "batch_size": batch_size, "vocab": vocab,
          "devices": jax.device_count(), "backend": jax.default_backend(),
          "train_samples_per_s": train_rate, "eval_samples_per_s": eval_rate,
          "input_samples_per_s": input_rate, "input_share_of_step": train_rate / input_rate,
          "compile_s": compile_s,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="mian,din")
  parser.add_argument("--batch_sizes", default="128,1024")
  parser.add_argument("--vocab", default="electronics", choices=sorted(VOCABS))
  parser.add_argument("--seconds", type=float, default=20.0, help="steady-state time per pair")
  parser.add_argument("--out", default="runs/throughput.jsonl")
  parser.add_argument("--single", default="", help=argparse.SUPPRESS)  # model,batch: child mode
  args = parser.parse_args()
  if args.single:
    model, batch = args.single.split(",")
    print(json.dumps(measure(model, int(batch), args.vocab, args.seconds)))
    return
  rows = []
  for model in args.models.split(","):
    for batch in args.batch_sizes.split(","):
      result = subprocess.run([sys.executable, __file__, f"--single={model},{batch}",
                               f"--vocab={args.vocab}", f"--seconds={args.seconds}"],
                              capture_output=True, text=True)
      if result.returncode:
        sys.exit(f"error: {model} at batch {batch} failed:\n{result.stderr[-2000:]}")
      row = json.loads(result.stdout.strip().splitlines()[-1])
      rows.append(row)
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
      print(f"{row['model']:>10} batch {row['batch_size']:>5}: "
            f"train {row['train_samples_per_s']:>9.0f}/s  eval {row['eval_samples_per_s']:>9.0f}/s"
            f"  input {row['input_samples_per_s']:>9.0f}/s  compile {row['compile_s']:5.1f}s"
            f"  peak RSS {row['peak_rss_mb']:6.0f} MB", flush=True)


if __name__ == "__main__":
  main()
