"""MIAN on MovieLens-100K (default) or MovieLens-1M from the original raw files.

  MIAN_JAX_MOVIELENS_DIR=/data/ml-100k python -m mian_jax.main --config=configs/movielens.py \
      --workdir=runs/ml100k
  python -m mian_jax.main --config=configs/movielens.py:1m --config.data.raw_dir=/data/ml-1m \
      --workdir=runs/ml1m
  python -m mian_jax.prepare --config=configs/movielens.py   # prepare only, print stats

Raw files: https://files.grouplens.org/datasets/movielens/ml-100k.zip (u.data, u.user, u.item)
or ml-1m.zip (ratings.dat, users.dat, movies.dat), unzipped into `data.raw_dir`. An empty
`data.raw_dir` is filled from $MIAN_JAX_MOVIELENS_DIR when the config loads (so the folder is part
of the prepared-data cache key). Fields, label and split: docs/data.md.

Argument: "100k" | "1m" | "variant=1m[,model=mian][,reading=paper_literal]".
"""

import os

import ml_collections

from mian_jax import config_defaults

VARIANTS = ("100k", "1m")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg in VARIANTS:
    arg = f"variant={arg}"
  args = config_defaults.parse_arg(arg, {"variant": "100k"})
  if args["variant"] not in VARIANTS:
    raise ValueError(f"config argument variant={args['variant']!r}: expected one of {VARIANTS}")
  config = config_defaults.get_config_from_args(args)

  config.data.source = "movielens"
  config.data.raw_dir = os.environ.get("MIAN_JAX_MOVIELENS_DIR", "")  # folder with the raw files
  config.data.max_bad_row_ratio = 0.001  # malformed rows tolerated per file, else fail
  m = config.data.movielens = ml_collections.ConfigDict()
  m.variant = args["variant"]  # "100k" | "1m"
  m.click_threshold = 4  # label = rating >= this
  m.valid_fraction = 0.1  # global time cut: the 10% of ratings before the test period
  m.test_fraction = 0.1  # the last 10% of ratings by timestamp
  m.zip_prefix_len = 1  # user.zip_prefix = first characters of the zip code (US region)

  # ~80k (100K) / ~800k (1M) training examples at batch 128: 625 / 6250 steps per epoch.
  config.train.num_epochs = 2.0 if args["variant"] == "100k" else 1.0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 500 if args["variant"] == "100k" else 2000
  config.checkpoint.every_steps = 500 if args["variant"] == "100k" else 2000
  return config
