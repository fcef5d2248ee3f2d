"""What the benchmarks share: flag parsing (the launch tools' too), synthetic Amazon-sized
arrays, base configs (overridden with `mian_jax.workdir.load_config`), the model / state / step
set-up on arrays in memory, and the DeepCTR-Torch peer subprocess.

A benchmark that trains on a prepared data directory uses `mian_jax.steps.setup`; one that
measures on arrays it draws itself (throughput, ab_step, profile_step, roofline) uses
`setup_arrays`, the same pieces (`steps.create_train_state`, `steps.make_train_step`,
`steps.make_eval_step`) without a data directory. Results are appended with `append_jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags
from ml_collections import ConfigDict

from mian_jax.errors import usage_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (items, categories, users): Amazon 5-core sizes of Table 1 of the paper; "tiny": smoke tests.
VOCABS = {"electronics": (63_001, 801, 192_403), "books": (367_982, 1_600, 603_668),
          "tiny": (500, 20, 300)}
NUM_EXAMPLES = 65_536  # rows of the synthetic arrays batches are drawn from
MAX_SEQ_LEN = 30
OPTIMIZERS = ("adam", "lazy_adam")
PEER_MODULE = "benchmarks.deepctr_peer"  # run by the peer's python, from the repository root
DEFAULT_PEER_PYTHON = os.environ.get("MIAN_JAX_PEER_PYTHON", ".venv-torch/bin/python")


# ----------------------------------------------------------------------------- flags


_HELP = {"-h", "-help", "--help", "--helpshort", "--helpfull"}


def parse_flags(argv: Sequence[str] | None, usage: str,
                define: Callable[[flags.FlagValues], None], rest: str | None = None,
                config_overrides: bool = False) -> types.SimpleNamespace:
  """`argv` (None: sys.argv[1:]) parsed by absl against the flags `define(fv)` declares on a
  fresh FlagValues, so that main(argv) can run many times in one process. Returns the values;
  as attribute `rest` (if named) the arguments after a `--`; with `config_overrides`, as
  `overrides` the `--config.<key>=<value>` flags given anywhere. Any other argument, a bad flag
  or a missing `--` part is one line `error: ...` and exit status 2; --help prints `usage`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, after = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
      argv, [])
  fv = flags.FlagValues()
  define(fv)
  if _HELP.intersection(argv):
    print(f"{usage.strip()}\n\nflags:\n{fv.get_help(include_special_flags=False)}")
    sys.exit(0)
  overrides = [a for a in argv if config_overrides and a.startswith("--config.")]
  try:
    stray = fv(["", *(a for a in argv if a not in overrides)])[1:]
  except flags.Error as e:
    usage_error(str(e))
  if stray or (after and rest is None):
    usage_error(f"unrecognized arguments: {' '.join(stray or after)}")
  return types.SimpleNamespace(**fv.flag_values_dict(), **({rest: after} if rest else {}),
                               **({"overrides": overrides} if config_overrides else {}))


def append_jsonl(path: str, rows: Iterable[Mapping]) -> None:
  """Appends one JSON object per row, one a line, to `path` (its directory created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.writelines(json.dumps(dict(row)) + "\n" for row in rows)


def define_model_flags(fv: flags.FlagValues, model: str, batch_size: int, optimizer: str,
                       vocab: str) -> None:
  """--model, --batch_size, --optimizer and --vocab with these defaults."""
  flags.DEFINE_string("model", model, "the model (mian_jax.models.MODELS)", flag_values=fv)
  flags.DEFINE_integer("batch_size", batch_size, "examples per step", flag_values=fv)
  flags.DEFINE_enum("optimizer", optimizer, list(OPTIMIZERS), "config.train.optimizer",
                    flag_values=fv)
  flags.DEFINE_enum("vocab", vocab, sorted(VOCABS), "vocabulary sizes (VOCABS)", flag_values=fv)


def define_config_flag(fv: flags.FlagValues) -> None:
  """A required --config=<file>[:<arg>] (a config file, as `mian_jax.main` takes it)."""
  flags.DEFINE_string("config", None, "configs/<dataset>.py[:arg]", flag_values=fv)
  flags.mark_flag_as_required("config", flag_values=fv)


def define_peer_flags(fv: flags.FlagValues) -> None:
  """--peer_python and --peer_threads: how the DeepCTR-Torch peer runs."""
  flags.DEFINE_string("peer_python", DEFAULT_PEER_PYTHON,
                      "python of a venv with torch and deepctr-torch", flag_values=fv)
  flags.DEFINE_integer("peer_threads", 0,
                       "torch.set_num_threads for the peer; 0 = os.cpu_count()", flag_values=fv)


# ----------------------------------------------------------------------------- data and configs


def make_data(vocab: str, seed: int = 0, num_examples: int = NUM_EXAMPLES):
  """Random prepared-format columns with Amazon-sized vocabularies (VOCABS[vocab]), 30
  behaviours per example; returns (schema, columns)."""
  from mian_jax.data import schema as schema_lib  # noqa: PLC0415 - jax only when measuring
  items, categories, users = VOCABS[vocab]
  reserved = schema_lib.NUM_RESERVED_IDS
  cat = lambda name, n: schema_lib.Field(name, "categorical", n + reserved)  # noqa: E731
  features = schema_lib.FeatureSpec(
      item_fields=(cat("item_id", items), cat("category", categories)),
      behavior_fields=("item_id", "category"),
      user_fields=(cat("user_id", users), cat("activity", 8)),
      context_fields=(cat("month", 12), cat("weekday", 7), cat("gap", 6)),
      max_seq_len=MAX_SEQ_LEN)
  n = num_examples
  schema = schema_lib.Schema(features, (("train", n), ("valid", n), ("test", n)))
  rng = np.random.default_rng(seed)
  ids = lambda size, shape: (rng.integers(0, size, shape) + reserved).astype(np.int32)  # noqa
  lengths = rng.integers(1, MAX_SEQ_LEN + 1, n).astype(np.int32)
  valid = np.arange(MAX_SEQ_LEN)[None] < lengths[:, None]
  columns = {"item.item_id": ids(items, n), "item.category": ids(categories, n),
             "hist.item_id": np.where(valid, ids(items, (n, MAX_SEQ_LEN)), 0).astype(np.int32),
             "hist.category": np.where(valid, ids(categories, (n, MAX_SEQ_LEN)), 0
                                       ).astype(np.int32),
             "hist_len": lengths, "user.user_id": ids(users, n), "user.activity": ids(8, n),
             "context.month": ids(12, n), "context.weekday": ids(7, n), "context.gap": ids(6, n),
             "label": rng.integers(0, 2, n).astype(np.float32),
             "group_id": rng.integers(0, users, n).astype(np.int64)}
  schema_lib.validate_columns(schema, "train", columns)
  return schema, columns


def make_config(model_name: str, batch_size: int, optimizer: str = "adam") -> ConfigDict:
  """mian_jax/config_defaults.py's base config (§4.3 settings) for one model, batch size and
  optimizer."""
  from mian_jax import config_defaults  # noqa: PLC0415
  config = config_defaults.get_base_config()
  config.model.name = model_name
  config.train.batch_size = batch_size
  config.train.optimizer = optimizer
  return config


# ----------------------------------------------------------------------------- set-up


@dataclasses.dataclass(frozen=True)
class ArraysRun:
  """What `setup_arrays` builds: `steps.Run`'s model, state and steps, on arrays in memory.

  Attributes:
    mesh: the 1-D "data" mesh.
    model: the Flax module.
    state: a fresh replicated train state, initialised from `train.seed`.
    train_step: jitted (state, batch, rng) -> (state, metrics); donates state.
    eval_step: jitted (state, batch) -> {"prob": [B]}.
    batches: the training batches of the arrays, in the order of `train.seed`.
    sample: the first batch on the device (the one the state was initialised with).
  """

  mesh: Any
  model: Any
  state: Any
  train_step: Callable
  eval_step: Callable
  batches: Any
  sample: Any


def setup_arrays(config: ConfigDict, schema, columns, mesh=None) -> ArraysRun:
  """The model, a fresh state and the jitted steps of `config` for columns in memory (those of
  `make_data` or of a directory read whole), as `steps.build` makes them (config.sharding
  included); `mesh` default: every device, sharding.model of them along "model"."""
  from mian_jax import sharding, steps  # noqa: PLC0415
  from mian_jax.data import pipeline  # noqa: PLC0415
  if mesh is None:
    mesh = sharding.create_mesh(model=config.sharding.model)
  batches = pipeline.TrainBatches(columns, schema, config.train.batch_size,
                                  seed=config.train.seed)
  sample = sharding.to_global(batches.batch(0), mesh)
  model, state, train_step, eval_step = steps.build(config, schema.features, sample, mesh)
  return ArraysRun(mesh=mesh, model=model, state=state, train_step=train_step,
                   eval_step=eval_step, batches=batches, sample=sample)


# ----------------------------------------------------------------------------- the peer


def check_peer_python(peer_python: str) -> None:
  """Exits with how to create it when `peer_python` is not an executable."""
  if not (os.path.isfile(peer_python) and os.access(peer_python, os.X_OK)):
    sys.exit(f"error: --peer_python={peer_python} not found; create it with: python3 -m "
             "venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 "
             "deepctr-torch requests")


def peer_hparams(config: ConfigDict, l2: dict[str, float]) -> dict[str, Any]:
  """The hyper-parameters of `config` the peer builds and trains its model with, L2 included
  (`compare_deepctr.peer_l2`)."""
  m, t = config.model, config.train
  return {"embed_dim": m.embed_dim, "mlp_dims": list(m.mlp_dims),
          "attention_mlp_dims": list(m.attention_mlp_dims), "use_dice": m.use_dice,
          "dropout_rate": m.dropout_rate, "init_std": m.init_std,
          "batch_size": t.batch_size, "learning_rate": t.learning_rate,
          "adam_b1": t.adam_b1, "adam_b2": t.adam_b2, "adam_eps": t.adam_eps, **l2}


def run_peer(request: dict, peer_python: str, timeout: float) -> dict:
  """Runs benchmarks/deepctr_peer.py on `request` with `peer_python` (from the repository root,
  its paths made absolute); returns its result row. RuntimeError with stderr's last line if it
  fails."""
  request = {**request, **{k: os.path.abspath(request[k]) for k in ("data_dir", "out_dir")
                           if k in request}}
  with tempfile.TemporaryDirectory(prefix="deepctr-peer-") as tmp:
    path = os.path.join(tmp, "request.json")
    with open(path, "w") as f:
      json.dump(request, f)
    if os.sep in peer_python:  # a path, given relative to where the benchmark was started
      peer_python = os.path.abspath(peer_python)
    proc = subprocess.run([peer_python, "-m", PEER_MODULE, f"--request={path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
  lines = [x for x in proc.stdout.splitlines() if x.startswith("PEER_RESULT ")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    raise RuntimeError(f"DeepCTR-Torch peer failed ({request['model']}, seed {request['seed']}, "
                       f"batch {request['hparams']['batch_size']}, exit {proc.returncode}): "
                       f"{tail}")
  return json.loads(lines[-1][len("PEER_RESULT "):])
