"""MIAN on Amazon Electronics (2014 5-core reviews + metadata; see docs/data.md).

  python -m mian_jax.main --config=configs/electronics.py --workdir=runs/electronics
  python -m mian_jax.main --config=configs/electronics.py:protocol=din,model=mian --workdir=runs/e

The raw files are read from --config.data.raw_dir (default: <cache>/raw/amazon) and downloaded
there from SNAP when missing. Model and training settings are the paper's defaults
(configs/common.py).
"""

import ml_collections

from configs import books
from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return books.get_amazon_config("electronics", common.parse_arg(arg, {"protocol": "mian"}))
