"""MIAN on Amazon Books (2014 5-core reviews + metadata; see docs/data.md).

  python -m mian_jax.main --config=configs/books.py --workdir=runs/books
  python -m mian_jax.main --config=configs/books.py:protocol=din,model=mian --workdir=runs/b

The raw files are read from --config.data.raw_dir (default: <cache>/raw/amazon) and downloaded
there from SNAP when missing. Model and training settings are the paper's defaults, and the
Amazon data settings are shared with electronics.py and amazon_like.py
(mian_jax/config_defaults.py).
"""

import ml_collections

from mian_jax import config_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_defaults.get_amazon_config(
      "books", config_defaults.parse_arg(arg, {"protocol": "mian"}))
