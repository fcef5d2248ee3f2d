"""Trains and evaluates a model; rerunning with the same --workdir resumes.

  python -m mian_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      [--config.train.batch_size=256 ...]
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mian_jax import cli, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation output.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py[:arg]).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_jax()
  logging.info("Config:\n%s", FLAGS.config)
  cli.run_or_exit(train.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
