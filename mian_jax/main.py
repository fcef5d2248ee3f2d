"""Trains and evaluates a model; rerunning with the same --workdir resumes.

  python -m mian_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \\
      [--config.train.batch_size=256 ...]
  python -m mian_jax.main --workdir=runs/synthetic [--config.train.num_epochs=2]   # resume

Without --config, a workdir's recorded config (its config.json) is used. SIGTERM or SIGINT
saves a checkpoint at the step reached and exits with status 128 + the signal's number.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mian_jax import cli, train
from mian_jax import workdir as workdir_lib
from mian_jax.errors import Preempted

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation output.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py[:arg]); "
                                "default: the --workdir's recorded config.json.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.init_process(argv)
  try:
    cli.run_or_exit(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)
  except Preempted as e:
    logging.warning("%s", e)
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(workdir_lib.with_recorded_config(argv)))
