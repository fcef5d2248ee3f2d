"""What several test modules share: the tiny config (as a ConfigDict and as command-line
flags), NumPy references, and small run helpers. Fixtures live in conftest.py."""

import os

import jax
import numpy as np

from configs import synthetic
from mian_jax import checkpointing, sharding, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The synthetic config shrunk to seconds: embed 4, seq 6, batch 16.
TINY_OVERRIDES = {
    "data.synthetic.num_users": 60, "data.synthetic.num_items": 40,
    "data.synthetic.num_categories": 5, "data.synthetic.num_occupations": 6,
    "data.synthetic.num_train": 1024, "data.synthetic.num_valid": 256,
    "data.synthetic.num_test": 256, "data.synthetic.min_seq_len": 2,
    "data.synthetic.short_seq_len": 1, "data.synthetic.recent_window": 3,
    "data.max_seq_len": 6, "model.embed_dim": 4, "model.num_heads": 2, "model.gim_dim": 8,
    "model.mlp_dims": (8, 4), "train.batch_size": 16, "train.log_every_steps": 4,
    "train.eval_every_steps": 4, "eval.batch_size": 64, "checkpoint.every_steps": 4,
}
# The same as command-line overrides of configs/synthetic.py (the number of steps left to the
# caller; tiny_config trains 8).
TINY = [f"--config.{key}={value}".replace(" ", "") for key, value in TINY_OVERRIDES.items()]


def tiny_config(**overrides):
  """configs/synthetic.py with TINY_OVERRIDES, 8 train steps, then `overrides` ("a.b": value)."""
  config = synthetic.get_config()
  for key, value in {**TINY_OVERRIDES, "train.num_train_steps": 8, **overrides}.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def np_softmax(x, mask=None):
  """Softmax over the last axis, masked entries 0 (a row without any: all 0)."""
  x = np.where(mask, x, -np.inf) if mask is not None else x
  peak = np.max(x, -1, keepdims=True)
  peak = np.where(np.isfinite(peak), peak, 0)
  e = np.where(mask, np.exp(x - peak), 0) if mask is not None else np.exp(x - peak)
  s = e.sum(-1, keepdims=True)
  return e / np.where(s > 0, s, 1)


def train_on_devices(config, devices, num_steps):
  """The state after `num_steps` train steps of `config` on a mesh over `devices`."""
  run = steps.setup(config, sharding.create_mesh(devices))
  batches, state = run.train_batches(), run.state
  for step in range(num_steps):
    state, _ = run.train_step(state, sharding.to_global(batches.batch(step), run.mesh),
                              jax.random.PRNGKey(1))
  return state


def final_params(config, workdir):
  """(parameters on the host, progress metadata) of the latest checkpoint in `workdir`."""
  state = steps.setup(config, sharding.create_mesh()).state
  manager = checkpointing.create_manager(workdir, config.checkpoint, read_only=True)
  state, meta = checkpointing.restore(manager, state)
  manager.close()
  return jax.device_get(state.params), meta


def markdown_rows(text):
  """The rows of the first Markdown table in `text`, checked to be one (same number of cells in
  every line, a separator line of dashes and colons)."""
  lines = [line for line in text.splitlines() if line.startswith("|")]
  assert len(lines) >= 3, text
  width = lines[0].count("|")
  assert all(line.count("|") - line.count("\\|") == width for line in lines), text
  assert set(lines[1].replace("|", "").replace("-", "").replace(":", "")) == set(), lines[1]
  return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
