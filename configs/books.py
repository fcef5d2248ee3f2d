"""MIAN on Amazon Books (2014 5-core reviews + metadata; see docs/data.md).

  python -m mian_jax.main --config=configs/books.py --workdir=runs/books
  python -m mian_jax.main --config=configs/books.py:protocol=din,model=mian --workdir=runs/b

The raw files are read from --config.data.raw_dir (default: <cache>/raw/amazon) and downloaded
there from SNAP when missing. Model and training settings are the paper's defaults
(configs/common.py).
"""

import ml_collections

from configs import common

PROTOCOLS = ("mian", "din", "dien")


def get_amazon_config(dataset: str, args: dict[str, object]) -> ml_collections.ConfigDict:
  """The config of an Amazon data set ("books" | "electronics") from parsed config arguments
  (model, reading, protocol); also used by electronics.py and amazon_like.py."""
  if args["protocol"] not in PROTOCOLS:
    raise ValueError(f"config argument protocol={args['protocol']!r}: expected one of {PROTOCOLS}")
  config = common.get_config_from_args(args)

  config.data.source = "amazon"
  config.data.dataset = dataset  # "books" | "electronics"
  config.data.protocol = args["protocol"]  # "mian" (§4.1, default) | "din" | "dien"
  config.data.raw_dir = ""  # "" = <cache>/raw/amazon; files are downloaded there if missing
  config.data.base_url = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
  config.data.max_bad_row_ratio = 0.01  # fail if more of the lines than this are unusable
  config.data.seed = 0  # negatives and (dien) the user split
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return get_amazon_config("books", common.parse_arg(arg, {"protocol": "mian"}))
