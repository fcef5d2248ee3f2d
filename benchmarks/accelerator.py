"""MIAN's training throughput on an accelerator across batch sizes and device meshes, and what a
Books epoch costs.

  python -m benchmarks.accelerator --out=runs/accelerator.jsonl            # GPU/TPU, < 5 min
  python -m benchmarks.accelerator --meshes=8x1,4x2,2x4,1x8 --batch_sizes=1024,8192 \\
      --out=runs/accelerator_meshes.jsonl                                  # 8 devices
  python -m benchmarks.accelerator --batch_sizes=128,256 --vocab=tiny --seconds=2  # CPU smoke

For each mesh (data x model; default: every device along "data"), optimizer (dense optax Adam
and our lazy Adam, mian_jax/optim.py) and batch size (default 128 to 16,384) it measures, in
this one process, MIAN's steady-state training samples/s on Books-sized vocabularies
(benchmarks/throughput.py's `measure`: batches already on the device, after compilation), its
evaluation samples/s and compile time, the train state's bytes on one device, and derives the
time of one epoch of Amazon Books (BOOKS_EPOCH_SAMPLES training samples, the paper reports
3,700 s on 4 K80s). On a mesh with model > 1 the tables of at least --row_shard_min_rows rows
(default: Books' item_id and user_id) are row-sharded over "model" (config.sharding,
docs/training.md). One process keeps the total time down: each row costs its compilation plus
about 2 x --seconds. Results print as a table and append one JSON object per row to --out.
"""

from __future__ import annotations

import time

from absl import flags

from benchmarks import common, throughput

BOOKS_EPOCH_SAMPLES = 8_900_000  # Amazon Books training samples per epoch (issue text, ~8.9 M)
PAPER_BOOKS_EPOCH_S = 3_700  # MIAN, 4 K80 GPUs (§4.3 of the paper)
DEFAULT_BATCH_SIZES = "128,256,512,1024,2048,4096,8192,16384"


def epoch_seconds(train_samples_per_s: float) -> float:
  """Seconds of one Books epoch at a training rate."""
  return BOOKS_EPOCH_SAMPLES / train_samples_per_s


DEFAULT_ROW_SHARD_MIN_ROWS = 100_000  # Books: item_id (367,984) and user_id (603,670)


def parse_meshes(text: str, device_count: int) -> list[tuple[int, int]]:
  """"4x2,8x1" -> [(4, 2), (8, 1)] (data, model); "" -> [(device_count, 1)].

  Raises:
    ValueError: a malformed shape, or one that does not use every device.
  """
  if not text:
    return [(device_count, 1)]
  meshes = []
  for part in text.split(","):
    data, sep, model = part.partition("x")
    if not (sep and data.isdigit() and model.isdigit()) or int(data) * int(model) == 0:
      raise ValueError(f"--meshes: {part!r} is not <data>x<model>, e.g. 4x2")
    if int(data) * int(model) != device_count:
      raise ValueError(f"--meshes: {part} uses {int(data) * int(model)} devices, but there are "
                       f"{device_count}")
    meshes.append((int(data), int(model)))
  return meshes


def format_table(rows: list[dict]) -> str:
  header = (f"{'mesh':>6} {'optimizer':>10} {'batch':>6} {'train/s':>10} {'eval/s':>11} "
            f"{'compile s':>9} {'state MB/dev':>12} {'Books epoch':>12} {'vs paper':>9}")
  lines = [header, "-" * len(header)]
  for r in rows:
    mesh = f"{r['mesh']['data']}x{r['mesh']['model']}"
    lines.append(f"{mesh:>6} {r['optimizer']:>10} {r['batch_size']:>6} "
                 f"{r['train_samples_per_s']:>10.0f} {r['eval_samples_per_s']:>11.0f} "
                 f"{r['compile_s']:>9.1f} {r['state_mb_per_device']:>12.1f} "
                 f"{r['books_epoch_s']:>11.0f}s {PAPER_BOOKS_EPOCH_S / r['books_epoch_s']:>8.1f}x")
  return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("batch_sizes", DEFAULT_BATCH_SIZES, "comma-separated batch sizes",
                      flag_values=fv)
  flags.DEFINE_string("optimizers", "lazy_adam,adam", "comma-separated optimizers",
                      flag_values=fv)
  flags.DEFINE_enum("vocab", "books", sorted(common.VOCABS), "vocabulary sizes", flag_values=fv)
  flags.DEFINE_float("seconds", 5.0, "steady-state time per pair", flag_values=fv)
  flags.DEFINE_string("model", "mian", "the model", flag_values=fv)
  flags.DEFINE_string("meshes", "", "comma list of <data>x<model> shapes using every device, "
                      "e.g. 8x1,4x2,1x8 (default: all devices along data)", flag_values=fv)
  flags.DEFINE_integer("row_shard_min_rows", DEFAULT_ROW_SHARD_MIN_ROWS, "on a mesh with "
                       "model > 1, tables of at least this many rows are row-sharded over model",
                       flag_values=fv)
  flags.DEFINE_string("out", "runs/accelerator.jsonl", "JSONL file rows are appended to",
                      flag_values=fv)


def main(argv=None) -> None:
  args = common.parse_flags(argv, __doc__, define_flags)
  import jax  # noqa: PLC0415
  try:
    meshes = parse_meshes(args.meshes, jax.device_count())
  except ValueError as e:
    common.usage_error(str(e))
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind}", flush=True)
  rows, start = [], time.perf_counter()
  for _, model_axis in meshes:
    for optimizer in args.optimizers.split(","):
      for batch in (int(b) for b in args.batch_sizes.split(",")):
        row = throughput.measure(
            args.model, batch, args.vocab, args.seconds, optimizer, mesh_model=model_axis,
            row_shard_min_rows=args.row_shard_min_rows if model_axis > 1 else 0)
        row["books_epoch_s"] = epoch_seconds(row["train_samples_per_s"])
        row["device_kind"] = jax.devices()[0].device_kind
        rows.append(row)
        common.append_jsonl(args.out, [row])
        print(format_table([row]).splitlines()[-1], f"({time.perf_counter() - start:.0f}s)",
              flush=True)
  print()
  print(format_table(rows))
  print(f"Books epoch = {BOOKS_EPOCH_SAMPLES:,} samples / train samples/s; the paper: "
        f"{PAPER_BOOKS_EPOCH_S} s on 4 K80s. Appended to {args.out}")


if __name__ == "__main__":
  main()
