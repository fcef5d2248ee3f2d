"""A config file that returns the config a workdir was trained with: its `config.json`.

  python -m mian_jax.evaluate --config=launch/recorded_config.py:runs/table4/mian/seed0 \
      --workdir=runs/table4/mian/seed0 --step=best --split=test --predictions

So a run can be evaluated without knowing the config file and overrides it was started with
(launch/figure6.py does this). JSON has no tuples; every list comes back as the tuple the config
held, so the result equals the recorded config key for key and type for type.
"""

from __future__ import annotations

import json
import os

import ml_collections


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist: {workdir} is not a training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
