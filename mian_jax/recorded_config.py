"""A config file that returns the config a workdir was trained with: its `config.json`.

  python -m mian_jax.evaluate --config=mian_jax/recorded_config.py:runs/table4/mian/seed0 \
      --workdir=runs/table4/mian/seed0 --step=best --split=test --predictions

Entry points add it themselves when given a --workdir but no --config
(`mian_jax.workdir.with_recorded_config`), so a run is evaluated or resumed without knowing
the config file and overrides it was started with. JSON has no tuples; every list comes back
as the tuple the config held, so the result equals the recorded config key for key and type
for type.
"""

from __future__ import annotations

import ml_collections

from mian_jax import workdir as workdir_lib


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(workdir: str) -> ml_collections.ConfigDict:
  recorded = workdir_lib.read_recorded_config(workdir)
  if recorded is None:
    raise ValueError(f"{workdir_lib.config_path(workdir)} does not exist: {workdir} is not a "
                     "training workdir")
  return ml_collections.ConfigDict(_tuples(recorded))
