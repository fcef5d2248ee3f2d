"""Evaluates a checkpoint of a workdir on one split and writes the metrics (and predictions).

  python -m mian_jax.evaluate --workdir=runs/synthetic [--step=latest|best|N] \
      [--split=valid|test] [--predictions] [--config=configs/synthetic.py] [--config.k=v ...]

The config is the workdir's recorded one (config.json) unless --config is given; either way
it must agree with the recorded config on every key that shapes the run
(`mian_jax.workdir.check_rerun`); `eval.batch_size` may differ.

`--step=best` restores `<workdir>/checkpoints_best` (the step of the best validation AUC),
`latest` (the default) the newest checkpoint, N that step. Writes
`<workdir>/eval/<split>_metrics_step<N>.json` (auc, logloss, gauc, step, num_examples, and
oracle_auc where the data knows the click probability), so the `<split>_metrics.json` that
training reported is never overwritten; with --predictions also
`<workdir>/eval/<split>_predictions_step<N>.parquet`: one row per example with its score, label,
group id and the model's attention weights (one list column per attention module).
"""

from __future__ import annotations

import os

import jax
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags, logging
from ml_collections import config_flags

from mian_jax import checkpointing, cli, config_checks, train
from mian_jax import workdir as workdir_lib
from mian_jax.errors import ConfigError, DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run (holds checkpoints/).")
flags.DEFINE_string("step", "latest", "Checkpoint to evaluate: latest, best (of validation AUC) "
                    "or a step number.")
flags.DEFINE_enum("split", "test", ["valid", "test"], "Split to evaluate.")
flags.DEFINE_bool("predictions", False, "Also write per-example predictions to Parquet.")
config_flags.DEFINE_config_file("config", None, "Config file used for training; default: the "
                                "--workdir's recorded config.json.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def write_predictions(path: str, predictions: dict, attention_names: dict[str, tuple]) -> None:
  """Writes per-example predictions atomically (temporary file, then rename)."""
  columns = {"score": predictions["prob"], "label": predictions["label"],
             "group_id": predictions["group_id"]}
  for key, values in predictions.items():
    if key.startswith("extra."):
      columns[key[len("extra."):]] = values
  table = pa.table(columns)
  for key, values in predictions.items():
    if key.startswith("attention."):
      name = key[len("attention."):]
      table = table.append_column(f"attention_{name}",
                                  pa.FixedSizeListArray.from_arrays(values.ravel(),
                                                                    values.shape[1]))
  metadata = {f"attention_{k}": ",".join(v) for k, v in attention_names.items()}
  table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
  tmp = f"{path}.tmp-{os.getpid()}"
  pq.write_table(table, tmp)
  os.replace(tmp, path)


def parse_step(text: str) -> int | str:
  """"latest", "best" or a step number (an int)."""
  if text in ("latest", "best"):
    return text
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f"--step={text!r}: expected latest, best or a step number") from None


def evaluate(config, workdir: str, step: int | str | None, split: str,
             with_predictions: bool) -> dict:
  """Restores a checkpoint and evaluates it on `split`.

  Args:
    step: "latest" (or None), "best" (from `checkpoints_best`) or a step number.
  """
  config_checks.check_config(config, jax.device_count())
  workdir_lib.check_workdir_path(workdir)
  workdir_lib.check_rerun(workdir, config.to_dict())
  step = "latest" if step is None else step
  directory = (checkpointing.best_checkpoint_dir(workdir) if step == "best" else
               checkpointing.checkpoint_dir(workdir))
  if not os.path.isdir(directory):
    raise DataError(f"no checkpoints in {workdir} (expected {directory})")
  mesh = train.create_mesh()
  data_dir, schema, model, state = train.load_model_and_state(config, mesh)
  manager = (checkpointing.create_best_manager(workdir, read_only=True) if step == "best" else
             checkpointing.create_manager(workdir, config.checkpoint, read_only=True))
  restored = checkpointing.restore(manager, state,
                                   step=step if isinstance(step, int) else None)
  manager.close()
  if restored is None:
    raise DataError(f"no readable checkpoint in {directory}")
  state, meta = restored
  if meta.get("schema_fingerprint") != schema.fingerprint():
    raise DataError(f"checkpoint in {workdir} was trained on data with another schema")
  predictions = train.predict_split(state, data_dir, schema, split, config.eval.batch_size,
                                    mesh, with_attention=with_predictions)
  result = train.split_metrics(predictions)
  result["step"] = int(state.step)
  if step == "best":
    result.update(selected="best", best_step=meta.get("best_step"),
                  best_valid_auc=meta.get("best_valid_auc"))
  train.write_metrics(workdir, split, result, final=False)
  logging.info("%s @ step %d: %s", split, result["step"], result)
  if with_predictions and jax.process_index() == 0:
    path = os.path.join(workdir, "eval", f"{split}_predictions_step{result['step']}.parquet")
    write_predictions(path, predictions, {
        "gim": getattr(model, "gim_part_names", lambda: ())(),
        "iuim": tuple(f.name for f in schema.features.user_fields),
        "icim": tuple(f.name for f in schema.features.context_fields)})
    logging.info("Wrote predictions to %s", path)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_jax()
  result = cli.run_or_exit(lambda: evaluate(FLAGS.config, FLAGS.workdir,
                                            parse_step(FLAGS.step), FLAGS.split,
                                            FLAGS.predictions))
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(result.items())))


def parse_flags(argv):
  return cli.parse_flags(workdir_lib.with_recorded_config(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
