"""MIAN on Amazon Electronics (2014 5-core reviews + metadata; see docs/data.md).

  python -m mian_jax.main --config=configs/electronics.py --workdir=runs/electronics
  python -m mian_jax.main --config=configs/electronics.py:protocol=din,model=mian --workdir=runs/e

The raw files are read from --config.data.raw_dir (default: <cache>/raw/amazon) and downloaded
there from SNAP when missing. Model and training settings are the paper's defaults
(mian_jax/config_defaults.py).
"""

import ml_collections

from mian_jax import config_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_defaults.get_amazon_config(
      "electronics", config_defaults.parse_arg(arg, {"protocol": "mian"}))
