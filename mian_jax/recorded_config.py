"""A config file that returns the config a workdir was trained with: its `config.json`.

  python -m mian_jax.evaluate --config=mian_jax/recorded_config.py:runs/table4/mian/seed0 \\
      --workdir=runs/table4/mian/seed0 --step=best --split=test --predictions

Entry points add it themselves when given a --workdir but no --config
(`mian_jax.workdir.with_recorded_config`).
"""

from mian_jax import workdir as workdir_lib


def get_config(workdir: str):
  return workdir_lib.recorded_config(workdir)
