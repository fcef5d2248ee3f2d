"""MIAN's training throughput on an accelerator across batch sizes, and what a Books epoch costs.

  python -m benchmarks.accelerator --out=runs/accelerator.jsonl            # GPU/TPU, < 5 min
  python -m benchmarks.accelerator --batch_sizes=128,256 --vocab=tiny --seconds=2  # CPU smoke

For each batch size (default 128 to 16,384) and optimizer (dense optax Adam and our lazy Adam,
mian_jax/optim.py) it measures, in this one process, MIAN's steady-state training samples/s on
Books-sized vocabularies (benchmarks/throughput.py's `measure`: batches already on the device,
after compilation), its evaluation samples/s and compile time, and derives the time of one epoch
of Amazon Books (BOOKS_EPOCH_SAMPLES training samples, the paper reports 3,700 s on 4 K80s).
One process keeps the total time down: each pair costs its compilation plus about 2 x --seconds.
Results print as a table and append one JSON object per pair to --out.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import common, throughput
from mian_jax import writers

BOOKS_EPOCH_SAMPLES = 8_900_000  # Amazon Books training samples per epoch (issue text, ~8.9 M)
PAPER_BOOKS_EPOCH_S = 3_700  # MIAN, 4 K80 GPUs (§4.3 of the paper)
DEFAULT_BATCH_SIZES = "128,256,512,1024,2048,4096,8192,16384"


def epoch_seconds(train_samples_per_s: float) -> float:
  """Seconds of one Books epoch at a training rate."""
  return BOOKS_EPOCH_SAMPLES / train_samples_per_s


def format_table(rows: list[dict]) -> str:
  header = (f"{'optimizer':>10} {'batch':>6} {'train/s':>10} {'eval/s':>11} {'compile s':>9} "
            f"{'Books epoch':>12} {'vs paper':>9}")
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r['optimizer']:>10} {r['batch_size']:>6} {r['train_samples_per_s']:>10.0f} "
                 f"{r['eval_samples_per_s']:>11.0f} {r['compile_s']:>9.1f} "
                 f"{r['books_epoch_s']:>11.0f}s {PAPER_BOOKS_EPOCH_S / r['books_epoch_s']:>8.1f}x")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch_sizes", default=DEFAULT_BATCH_SIZES)
  parser.add_argument("--optimizers", default="lazy_adam,adam")
  parser.add_argument("--vocab", default="books", choices=sorted(common.VOCABS))
  parser.add_argument("--seconds", type=float, default=5.0, help="steady-state time per pair")
  parser.add_argument("--model", default="mian")
  parser.add_argument("--out", default="runs/accelerator.jsonl")
  args = parser.parse_args(argv)
  import jax  # noqa: PLC0415
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind}", flush=True)
  rows, start = [], time.perf_counter()
  for optimizer in args.optimizers.split(","):
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      row = throughput.measure(args.model, batch, args.vocab, args.seconds, optimizer)
      row["books_epoch_s"] = epoch_seconds(row["train_samples_per_s"])
      row["device_kind"] = jax.devices()[0].device_kind
      rows.append(row)
      writers.append_jsonl(args.out, [row])
      print(format_table([row]).splitlines()[-1], f"({time.perf_counter() - start:.0f}s)",
            flush=True)
  print()
  print(format_table(rows))
  print(f"Books epoch = {BOOKS_EPOCH_SAMPLES:,} samples / train samples/s; the paper: "
        f"{PAPER_BOOKS_EPOCH_S} s on 4 K80s. Appended to {args.out}")


if __name__ == "__main__":
  main()
