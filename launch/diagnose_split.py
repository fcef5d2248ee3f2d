"""How cold are the evaluation splits, and how much AUC does bias alone reach?

  python -m launch.diagnose_split --config=configs/movielens.py \
      [--predictions=mian=runs/a.parquet,din=runs/b.parquet] [--predictions_split=test] \
      [--item_field=item_id] [--out=DIR] [--config.x=y ...]

The command line of mian_jax/diagnose.py, whose docstring says what the report holds: prints
it as markdown tables; with --out also writes `<out>/diagnostics.md` and
`<out>/diagnostics.json`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from mian_jax import cli, diagnose

flags.DEFINE_list("predictions", [], "Predictions Parquet files, `name=path` or `path`.")
flags.DEFINE_enum("predictions_split", "test", list(diagnose.EVAL_SPLITS),
                  "The split the predictions files score.")
flags.DEFINE_string("item_field", None, "Item field that identifies the candidate item "
                    "(default: the first behaviour field).")
flags.DEFINE_string("out", None, "Directory for diagnostics.md and diagnostics.json.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py[:arg]).",
                                lock_config=True)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(cli.run_or_exit(diagnose.run, FLAGS.config, FLAGS.predictions, FLAGS.predictions_split,
                        FLAGS.item_field, FLAGS.out), end="")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
