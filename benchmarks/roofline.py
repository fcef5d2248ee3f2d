"""Where the time must go: FLOPs and bytes per step of each model, and this machine's ceilings.

  python -m benchmarks.roofline --models=mian,din,dien,deepfm --vocab=electronics --batch_size=128

Per model (benchmarks/common.py's data and configs):
- train / eval FLOPs per sample: XLA's own count for the compiled train step (forward, backward,
  optimiser) and eval step (`Compiled.cost_analysis()["flops"]`, the dense-Adam step);
- embedding bytes of a dense Adam step: every row of every table is read or written
  ADAM_PASSES times (gradient written and read, parameter, first and second moment read and
  written), whatever rows the batch used; the lazy step touches only the rows the batch looked
  up (at most one per lookup), the same number of passes over them;
- the lower bounds these imply on this machine: FLOPs / peak matmul rate, bytes / stream rate.
The ceilings are measured here: float32 matmul GFLOP/s (a 1024^3 product, XLA) and the rate
of a large element-wise read+write (GB/s). Prints a markdown table and appends JSON to --out.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

from benchmarks import common, compare_deepctr

# Passes over a table per dense Adam step: gradient (written, read), parameter, first and second
# moment (each read and written).
ADAM_PASSES = 8
MATMUL_N = 1024
STREAM_BYTES = 256 * 2**20


def _best_seconds(fn, *args, repeats: int = 5, inner: int = 10) -> float:
  import jax  # noqa: PLC0415
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / inner)
  return best


def machine_ceilings() -> dict[str, float]:
  """Measured float32 matmul GFLOP/s and element-wise read+write GB/s of the default device."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
  matmul_s = _best_seconds(jax.jit(lambda x: x @ x), a)
  b = jnp.ones((STREAM_BYTES // 4,), jnp.float32)
  stream_s = _best_seconds(jax.jit(lambda x: x * 1.0001), b)
  return {"matmul_gflops": 2 * MATMUL_N**3 / matmul_s / 1e9,
          "stream_gbps": 2 * STREAM_BYTES / stream_s / 1e9}


def table_bytes(params) -> int:
  """Bytes of one copy of every embedding table (the leaves named "embedding")."""
  from flax import traverse_util  # noqa: PLC0415
  return sum(int(np.prod(v.shape)) * v.dtype.itemsize
             for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "embedding")


def model_costs(model_name: str, vocab: str, batch_size: int) -> dict:
  import jax  # noqa: PLC0415
  schema, columns = common.make_data(vocab, num_examples=max(4 * batch_size, 1024))
  config = common.make_config(model_name, batch_size, "adam")
  setup = common.setup_arrays(config, schema, columns)
  state, sample = setup.state, setup.sample
  cost = lambda c: (c[0] if isinstance(c, list) else c)["flops"]  # noqa: E731
  train_flops = cost(setup.train_step.lower(
      state, sample, jax.random.PRNGKey(1)).compile().cost_analysis())
  eval_flops = cost(setup.eval_step.lower(state, sample).compile().cost_analysis())
  tables = table_bytes(state.params)
  row_bytes = config.model.embed_dim * 4
  return {"model": model_name, "vocab": vocab, "batch_size": batch_size,
          "train_mflop_per_sample": train_flops / batch_size / 1e6,
          "eval_mflop_per_sample": eval_flops / batch_size / 1e6,
          "table_mb": tables / 1e6,
          "dense_adam_mb_per_step": ADAM_PASSES * tables / 1e6,
          "lazy_adam_mb_per_step_max": ADAM_PASSES * batch_size * row_bytes / 1e6
                                       * compare_deepctr.lookups_per_example(
                                           schema, np.asarray(columns["hist_len"]))}


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("models", "mian,din,dien,deepfm,xdeepfm,dcn,wide_deep,lr",
                      "comma-separated models", flag_values=fv)
  flags.DEFINE_enum("vocab", "electronics", sorted(common.VOCABS), "vocabulary sizes",
                    flag_values=fv)
  flags.DEFINE_integer("batch_size", 128, "examples per step", flag_values=fv)
  flags.DEFINE_string("out", "runs/roofline.jsonl", "JSONL file rows are appended to",
                      flag_values=fv)


def main(argv=None) -> None:
  args = common.parse_flags(argv, __doc__, define_flags)
  ceilings = machine_ceilings()
  print(f"ceilings: float32 matmul {ceilings['matmul_gflops']:.0f} GFLOP/s, element-wise "
        f"read+write {ceilings['stream_gbps']:.1f} GB/s\n")
  print("| model | train MFLOP/sample | eval MFLOP/sample | tables MB | dense Adam MB/step | "
        "lazy Adam MB/step (max) | FLOP bound ms/step | dense-Adam bytes bound ms/step |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    row = model_costs(name, args.vocab, args.batch_size)
    row.update(ceilings)
    row["flop_bound_ms"] = (row["train_mflop_per_sample"] * args.batch_size * 1e6
                            / (ceilings["matmul_gflops"] * 1e9) * 1e3)
    row["dense_adam_bound_ms"] = row["dense_adam_mb_per_step"] / ceilings["stream_gbps"]
    print(f"| {name} | {row['train_mflop_per_sample']:.3f} | {row['eval_mflop_per_sample']:.3f} "
          f"| {row['table_mb']:.1f} | {row['dense_adam_mb_per_step']:.0f} "
          f"| {row['lazy_adam_mb_per_step_max']:.1f} | {row['flop_bound_ms']:.2f} "
          f"| {row['dense_adam_bound_ms']:.1f} |", flush=True)
    common.append_jsonl(args.out, [row])


if __name__ == "__main__":
  main()
