"""Compare mian_jax's DIN and DeepFM with DeepCTR-Torch's on the same data and settings.

Trains each model of --models once per seed with both implementations, on the same prepared
data (mian_jax.data.ensure_prepared), with the same embedding width, MLP widths, dropout, batch
size, learning rate and Adam settings, the same number of steps and even the same batches,
scores both with mian_jax.metrics on the test split, prints a mean +- std table and appends
one JSON line per (impl, model, seed) to --out.

  python -m benchmarks.compare_deepctr --config=configs/synthetic.py --models=din,deepfm \\
      --seeds=0,1,2 --out=runs/compare.jsonl [--config.train.num_epochs=2 --config.x=y ...]

Any key of the config can be set with `--config.<key>=<value>`, as for `python -m
mian_jax.main` (types from the config; an unknown key is an error).

DeepCTR-Torch is *not* a dependency of mian-jax. It runs in its own virtual environment
(--peer_python), as a subprocess running `-m benchmarks.deepctr_peer` from the repository root:

  python3 -m venv .venv-torch
  .venv-torch/bin/pip install torch==2.13.0 deepctr-torch requests

(the exact pin picks the CPU wheel; a bare `torch` would fetch a multi-GB CUDA build).
deepctr-torch 0.3.0 imports `requests` (its PyPI version check) without declaring it, hence
the explicit `requests`; it needs no TensorFlow.

The peer gets its best CPU settings: torch.set_flush_denormal(True) and
torch.set_num_threads(--peer_threads, default os.cpu_count()). On a machine whose cores other
jobs already keep busy, fewer threads can be much faster: with 2 cores and a load of ~6, DIN
took 15.4 s for 30 steps at 2 threads and 0.29 s at 1 (OpenMP threads waiting on each other),
so pass --peer_threads=1 there. The mian_jax runs use JAX's defaults.

How the settings are matched (details and the remaining differences: docs/baselines.md,
"Comparison with DeepCTR-Torch"):

- feature columns: a SparseFeat per categorical candidate / user / context field, a
  VarLenSparseFeat "hist_<f>" per behaviour field with length_name="hist_len" and
  embedding_name=<f> (shares the candidate's table, as mian_jax does), a DenseFeat per numeric
  field; embedding_dim = model.embed_dim, init_std = model.init_std;
- dnn_hidden_units = model.mlp_dims, att_hidden_size = model.attention_mlp_dims,
  dnn_dropout = model.dropout_rate; DIN's activations PReLU (Dice with model.use_dice);
  no batch normalisation, unnormalised DIN attention (as mian_jax);
- Adam(learning_rate, adam_b1, adam_b2, adam_eps), batch_size, and the training steps of
  mian_jax (num_train_steps, else num_epochs x full batches per epoch) over the same per-epoch
  permutation of the training rows;
- L2 (--peer_l2): mian_jax adds l2_weight x (mean over the batch of each example's squared
  looked-up embeddings) to the *mean* BCE; DeepCTR-Torch adds l2_reg_embedding x (squared norm
  of the *whole* tables) to the *summed* BCE. "matched" picks l2_reg_embedding (and
  l2_reg_linear) = l2_weight x batch_size x L / V, L = looked-up rows per example (mean over the
  training split), V = rows of all tables: equal penalties in expectation when all rows have
  the same norm. "literal" passes l2_weight unchanged; a number is used as given.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags

from benchmarks import common

MODELS = ("din", "deepfm")
IMPLS = ("mian_jax", "deepctr_torch")
LENGTH_NAME = "hist_len"


# ----------------------------------------------------------------------------- pure helpers


def feature_column_spec(schema, combiner: str = "mean") -> dict[str, Any]:
  """The DeepCTR-Torch feature columns of a schema, as JSON the peer turns into columns.

  Args:
    schema: a mian_jax.data.schema.Schema.
    combiner: pooling of the behaviour sequences outside DIN's attention ("mean" | "sum"),
      config.model.sequence_pooling.

  Returns:
    {"columns": [...], "history_feature_list": [...], "length_column": "hist_len"}. Each column:
    {"kind": "sparse" | "varlen" | "dense", "name", "column" (the .npy column it reads),
    "vocab_size", "embedding_name"; varlen also "maxlen", "combiner", "length_name"}.
    Candidate fields keep their names (DIN pairs "<f>" with "hist_<f>"); user and context
    fields are prefixed "user_" / "context_". Columns come in mian_jax's field order: item,
    behaviours, user, context.
  """
  f = schema.features
  columns: list[dict[str, Any]] = []

  def add(group, field, name):
    if field.is_categorical:
      columns.append({"kind": "sparse", "name": name, "column": f"{group}.{field.name}",
                      "vocab_size": field.vocab_size, "embedding_name": name})
    else:
      columns.append({"kind": "dense", "name": name, "column": f"{group}.{field.name}"})

  for field in f.item_fields:
    add("item", field, field.name)
  for name in f.behavior_fields:
    columns.append({"kind": "varlen", "name": f"hist_{name}", "column": f"hist.{name}",
                    "vocab_size": f.item_field(name).vocab_size, "embedding_name": name,
                    "maxlen": f.max_seq_len, "combiner": combiner, "length_name": LENGTH_NAME})
  for field in f.user_fields:
    add("user", field, f"user_{field.name}")
  for field in f.context_fields:
    add("context", field, f"context_{field.name}")
  names = [c["name"] for c in columns] + ([LENGTH_NAME] if f.behavior_fields else [])
  if len(set(names)) != len(names):
    raise ValueError(f"feature column names collide: {names}")
  return {"columns": columns, "history_feature_list": list(f.behavior_fields),
          "length_column": LENGTH_NAME}


def lookups_per_example(schema, hist_len: np.ndarray) -> float:
  """Mean number of categorical embedding rows one example looks up (behaviours included)."""
  f = schema.features
  fields = (*f.item_fields, *f.user_fields, *f.context_fields)
  single = sum(1 for x in fields if x.is_categorical)
  mean_len = float(np.mean(hist_len)) if len(hist_len) else 0.0
  return single + mean_len * len(f.behavior_fields)


def table_rows(schema) -> int:
  """Rows of all embedding tables (behaviours share the item tables)."""
  f = schema.features
  return sum(x.vocab_size for x in (*f.item_fields, *f.user_fields, *f.context_fields)
             if x.is_categorical)


def peer_l2(mode: str, l2_weight: float, l2_scope: str, batch_size: int,
            lookups: float, rows: int) -> dict[str, float]:
  """DeepCTR-Torch's l2_reg_embedding / l2_reg_linear / l2_reg_dnn for mian_jax's L2.

  mode "matched": batch_embeddings -> l2_weight * batch_size * lookups / rows on the tables
  (see the module docstring); all_weights -> l2_weight * batch_size on tables and DNN kernels
  (their loss sums the BCE over the batch, ours averages); none -> 0. "literal": l2_weight as
  given on the tables. Otherwise `mode` is a float used on the tables.
  """
  if mode == "matched":
    if l2_scope == "none" or l2_weight == 0:
      emb, dnn = 0.0, 0.0
    elif l2_scope == "batch_embeddings":
      emb, dnn = l2_weight * batch_size * lookups / max(rows, 1), 0.0
    elif l2_scope == "all_weights":
      emb = dnn = l2_weight * batch_size
    else:
      raise ValueError(f"unknown train.l2_scope {l2_scope!r}")
  elif mode == "literal":
    emb, dnn = l2_weight, 0.0
  else:
    try:
      emb, dnn = float(mode), 0.0
    except ValueError:
      raise ValueError(f"--peer_l2={mode!r}: expected 'matched', 'literal' or a number") from None
  return {"l2_reg_embedding": emb, "l2_reg_linear": emb, "l2_reg_dnn": dnn}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  a = np.asarray(values, np.float64)
  if a.size == 0:
    return float("nan"), float("nan")
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
  """A text table of test AUC / logloss (mean +- std over seeds) per model and implementation,
  plus the difference ours - theirs per model."""
  header = (f"{'model':<8} {'impl':<14} {'seeds':>5} {'test AUC':>17} {'test logloss':>17} "
            f"{'train s':>8}")
  lines = [header, "-" * len(header)]
  models = list(dict.fromkeys(r["model"] for r in records))
  for model in models:
    means = {}
    for impl in IMPLS:
      rs = [r for r in records if r["model"] == model and r["impl"] == impl]
      if not rs:
        continue
      auc, auc_sd = mean_std([r["test_auc"] for r in rs])
      ll, ll_sd = mean_std([r["test_logloss"] for r in rs])
      secs, _ = mean_std([r["train_seconds"] for r in rs])
      means[impl] = (auc, auc_sd, ll, ll_sd)
      lines.append(f"{model:<8} {impl:<14} {len(rs):>5} {auc:>8.4f} ± {auc_sd:<6.4f} "
                   f"{ll:>8.4f} ± {ll_sd:<6.4f} {secs:>8.1f}")
    if len(means) == 2:
      (a1, s1, l1, _), (a2, s2, l2, _) = means["mian_jax"], means["deepctr_torch"]
      lines.append(f"{model:<8} {'ours - theirs':<14} {'':>5} {a1 - a2:>+8.4f} "
                   f"(sd {math.hypot(s1, s2):.4f}) {l1 - l2:>+8.4f}")
  lines.append("train s: mian_jax = train_and_evaluate wall time (compilation and evaluation "
               "included); deepctr_torch = its training loop only.")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- the two runs


def run_ours(config, model: str, seed: int) -> dict[str, Any]:
  from mian_jax import train  # noqa: PLC0415
  config = config.copy_and_resolve_references()
  config.model.name = model
  config.train.seed = seed
  if model == "din":  # DeepCTR-Torch's DIN: no candidate product, un-normalised weights
    config.model.baseline_inputs, config.model.din_attention_norm = "paper", "none"
  workdir = tempfile.mkdtemp(prefix=f"compare-{model}-{seed}-")
  try:
    start = time.perf_counter()
    results = train.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start  # includes compilation and evaluation
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {"test_auc": results["test"]["auc"], "test_logloss": results["test"]["logloss"],
          "valid_auc": results["valid"]["auc"], "valid_logloss": results["valid"]["logloss"],
          "steps": int(results["test"]["step"]), "train_seconds": seconds}


def run_theirs(config, model: str, seed: int, data_dir: str, spec: dict, steps: int,
               l2: dict, peer_python: str, dense_init: str, threads: int,
               timeout: float) -> dict[str, Any]:
  from mian_jax import metrics  # noqa: PLC0415
  from mian_jax.data import schema as schema_lib  # noqa: PLC0415
  out_dir = tempfile.mkdtemp(prefix=f"compare-peer-{model}-{seed}-")
  try:
    request = {
        "model": model, "seed": seed, "data_dir": data_dir, "spec": spec, "total_steps": steps,
        "out_dir": out_dir, "predict_splits": ["valid", "test"],
        "eval_batch_size": config.eval.batch_size, "dense_init": dense_init, "threads": threads,
        "hparams": common.peer_hparams(config, l2),
    }
    start = time.perf_counter()
    peer = common.run_peer(request, peer_python, timeout)
    wall = time.perf_counter() - start
    result = {"steps": peer["steps"], "train_seconds": peer["train_seconds"],
              "wall_seconds": wall, "peer": peer}
    for split in ("valid", "test"):
      labels = schema_lib.load_split(data_dir, split, validate=False)["label"]
      probs = np.load(os.path.join(out_dir, f"pred_{split}.npy"), allow_pickle=False)
      result[f"{split}_auc"] = metrics.auc(labels, probs)
      result[f"{split}_logloss"] = metrics.logloss(labels, probs)
    return result
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- main


def define_flags(fv: flags.FlagValues) -> None:
  """The flags; `--config.<key>=<value>` overrides (repeatable) may come anywhere."""
  string = functools.partial(flags.DEFINE_string, flag_values=fv)
  common.define_config_flag(fv)
  string("models", "din,deepfm", f"comma list of {MODELS}")
  string("seeds", "0,1,2", "comma list of training seeds")
  string("out", "runs/compare.jsonl", "JSONL file results are appended to")
  common.define_peer_flags(fv)
  string("peer_l2", "matched", "'matched' | 'literal' | a number")
  flags.DEFINE_enum("peer_dense_init", "deepctr", ["deepctr", "lecun"],
                    "DeepCTR-Torch's own dense-layer init, or mian_jax's LeCun-normal",
                    flag_values=fv)
  string("impls", ",".join(IMPLS), f"comma list of {IMPLS}")
  flags.DEFINE_float("peer_timeout", 3600.0, "seconds per peer run", flag_values=fv)


def parse_args(argv=None) -> types.SimpleNamespace:
  return common.parse_flags(argv, __doc__, define_flags, config_overrides=True)


def main(argv=None) -> None:
  args = parse_args(argv)
  models = [x for x in args.models.split(",") if x]
  impls = [x for x in args.impls.split(",") if x]
  bad = sorted(set(models) - set(MODELS)) + sorted(set(impls) - set(IMPLS))
  if bad:
    sys.exit(f"error: unknown model or impl {bad}; models: {MODELS}, impls: {IMPLS}")
  try:
    seeds = [int(x) for x in args.seeds.split(",") if x]
  except ValueError:
    sys.exit(f"error: --seeds={args.seeds!r}: expected comma-separated integers")
  if "deepctr_torch" in impls:
    common.check_peer_python(args.peer_python)
  from mian_jax import workdir  # noqa: PLC0415
  try:
    config = workdir.load_config(args.config, args.overrides)
  except ValueError as e:
    sys.exit(f"error: {e}")

  from mian_jax import cli, data, train  # noqa: PLC0415
  from mian_jax.data import pipeline  # noqa: PLC0415
  from mian_jax.data import schema as schema_lib  # noqa: PLC0415
  from mian_jax.errors import MianError  # noqa: PLC0415
  cli.init_process()
  try:
    data_dir, schema = data.ensure_prepared(config.data)
    train_columns = schema_lib.load_split(data_dir, "train", schema, validate=False)
    per_epoch = pipeline.TrainBatches(train_columns, schema, config.train.batch_size,
                                      seed=config.train.seed).steps_per_epoch
    steps = train.total_train_steps(config.train, per_epoch)  # the steps ours will take
  except MianError as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  spec = feature_column_spec(schema, config.model.sequence_pooling)
  hist_len = np.asarray(train_columns["hist_len"])
  lookups, rows = lookups_per_example(schema, hist_len), table_rows(schema)
  l2 = peer_l2(args.peer_l2, config.train.l2_weight, config.train.l2_scope,
               config.train.batch_size, lookups, rows)
  peer_threads = args.peer_threads or os.cpu_count() or 1
  checksum = ""
  stats_path = os.path.join(data_dir, "stats.json")
  if os.path.isfile(stats_path):
    with open(stats_path) as f:
      checksum = json.load(f).get("checksum", "")
  m, t = config.model, config.train
  settings = {"embed_dim": m.embed_dim, "mlp_dims": list(m.mlp_dims),
              "attention_mlp_dims": list(m.attention_mlp_dims), "dropout_rate": m.dropout_rate,
              "use_dice": m.use_dice, "init_std": m.init_std,
              "sequence_pooling": m.sequence_pooling,
              "batch_size": t.batch_size, "learning_rate": t.learning_rate, "steps": steps,
              "l2_weight": t.l2_weight, "l2_scope": t.l2_scope}
  print(f"data: {data_dir} ({schema.size('train')} train / {schema.size('test')} test, "
        f"checksum {checksum[:12]})")
  print(f"settings: {json.dumps(settings)}")
  print(f"peer: {args.peer_python}, torch.set_num_threads({peer_threads}), "
        f"torch.set_flush_denormal(True), dense init {args.peer_dense_init!r}, "
        f"L2 {args.peer_l2!r} -> {json.dumps(l2)} "
        f"(L={lookups:.1f} lookups/example, V={rows} table rows)", flush=True)

  records = []
  for model in models:
    for seed in seeds:
      for impl in impls:
        try:
          if impl == "mian_jax":
            result = run_ours(config, model, seed)
          else:
            result = run_theirs(config, model, seed, data_dir, spec, steps, l2,
                                args.peer_python, args.peer_dense_init, peer_threads,
                                args.peer_timeout)
        except (MianError, RuntimeError, subprocess.TimeoutExpired) as e:
          sys.exit(f"error: {' '.join(str(e).split())}")
        record = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "impl": impl, "model": model, "seed": seed, "config": args.config,
                  "overrides": args.overrides, "data_dir": data_dir, "data_checksum": checksum,
                  "settings": settings, **result}
        if impl == "deepctr_torch":
          record.update(peer_l2=l2, peer_dense_init=args.peer_dense_init,
                        peer_threads=peer_threads)
        records.append(record)
        common.append_jsonl(args.out, [record])
        print(f"{model} {impl} seed {seed}: test AUC {record['test_auc']:.4f}, logloss "
              f"{record['test_logloss']:.4f} ({record['train_seconds']:.0f} s)", flush=True)
  print()
  print(format_table(records))
  print(f"\nresults appended to {args.out}")


if __name__ == "__main__":
  main()
