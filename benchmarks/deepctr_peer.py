"""Peer runner of benchmarks/compare_deepctr.py and benchmarks/throughput.py: DeepCTR-Torch side.

Runs under the *peer* interpreter (a separate venv with torch and deepctr-torch, see
compare_deepctr.py), never under the project venv: it imports only numpy, torch and
deepctr_torch, not mian_jax or jax. It reads the prepared .npy columns directly.

  .venv-torch/bin/python -m benchmarks.deepctr_peer --request=request.json  # repository root

The request holds the data directory, the feature-column spec and the hyper-parameters. Its
"mode" picks what runs; either way one JSON line, prefixed with "PEER_RESULT ", goes to stdout.

- "train" (the default; written by compare_deepctr.py): trains one model for "total_steps",
  then writes <out_dir>/pred_<split>.npy (float32 click probabilities, split order). The metrics
  are computed by the caller with mian_jax.metrics, so both implementations are scored by the
  same code.
- "throughput" (written by throughput.py --peer): speed only, see `run_throughput`.
- "predict" (written by serving.py --peer): serving latency and throughput, see `run_predict`.

Training loop: that of DeepCTR-Torch's `BaseModel.fit` (binary cross-entropy with
reduction="sum", plus `model.get_regularization_loss()` and `model.aux_loss`, one Adam step per
batch), written out here so that it can take exactly the batches mian_jax takes (same
permutation per epoch, full batches only) and so that `fit`'s per-batch sklearn metrics and
progress bar do not slow it down.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

# LeCun-normal as jax.nn.initializers.lecun_normal draws it: a normal truncated at +-2 std,
# rescaled by this constant so that the variance is exactly 1 / fan_in.
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def build_columns(spec: dict, embed_dim: int):
  """DeepCTR-Torch feature columns from the spec of compare_deepctr.feature_column_spec."""
  from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat  # noqa: PLC0415
  columns = []
  for c in spec["columns"]:
    if c["kind"] == "sparse":
      columns.append(SparseFeat(c["name"], vocabulary_size=c["vocab_size"],
                                embedding_dim=embed_dim, embedding_name=c["embedding_name"]))
    elif c["kind"] == "varlen":
      sparse = SparseFeat(c["name"], vocabulary_size=c["vocab_size"], embedding_dim=embed_dim,
                          embedding_name=c["embedding_name"])
      columns.append(VarLenSparseFeat(sparse, maxlen=c["maxlen"], combiner=c["combiner"],
                                      length_name=c["length_name"]))
    elif c["kind"] == "dense":
      columns.append(DenseFeat(c["name"], 1))
    else:
      raise ValueError(f"unknown column kind {c['kind']!r}")
  return columns


def build_matrix(data_dir: str, split: str, spec: dict, feature_index) -> np.ndarray:
  """The float32 input matrix [N, width] DeepCTR-Torch models take, in `feature_index` order."""
  source = {c["name"]: c["column"] for c in spec["columns"]}
  source.update({c["length_name"]: spec["length_column"] for c in spec["columns"]
                 if c.get("length_name")})
  width = max(end for _, end in feature_index.values())
  n = None
  x = None
  for name, (start, end) in feature_index.items():
    a = np.load(os.path.join(data_dir, split, source[name] + ".npy"), mmap_mode="r",
                allow_pickle=False)
    if x is None:
      n = a.shape[0]
      x = np.empty((n, width), np.float32)
    if a.dtype.kind in "iu" and a.size and int(a.max()) >= 2**24:
      raise ValueError(f"{source[name]}: ids >= 2**24 are not exact in DeepCTR-Torch's float "
                       "input matrix")
    x[:, start:end] = np.asarray(a, np.float32).reshape(n, end - start)
  return x


def lecun_reinit(model) -> int:
  """Re-initialises every nn.Linear as mian_jax's dense layers: LeCun-normal kernels, zero
  biases. Returns the number of layers changed."""
  import torch  # noqa: PLC0415
  count = 0
  for module in model.modules():
    if isinstance(module, torch.nn.Linear):
      std = math.sqrt(1.0 / module.in_features) / _TRUNCATED_NORMAL_STD
      torch.nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
      if module.bias is not None:
        torch.nn.init.zeros_(module.bias)
      count += 1
  return count


def build_model(req: dict, columns):
  """DeepCTR-Torch's DIN or DeepFM with the request's hyper-parameters (CPU, binary task)."""
  from deepctr_torch.models import DIN, DeepFM  # noqa: PLC0415
  h = req["hparams"]
  if req["model"] == "din":
    act = "dice" if h["use_dice"] else "prelu"
    return DIN(columns, req["spec"]["history_feature_list"], dnn_use_bn=False,
               dnn_hidden_units=tuple(h["mlp_dims"]), dnn_activation=act,
               att_hidden_size=tuple(h["attention_mlp_dims"]), att_activation=act,
               att_weight_normalization=False, l2_reg_dnn=h["l2_reg_dnn"],
               l2_reg_embedding=h["l2_reg_embedding"], dnn_dropout=h["dropout_rate"],
               init_std=h["init_std"], seed=req["seed"], task="binary", device="cpu")
  if req["model"] == "deepfm":
    return DeepFM(columns, columns, use_fm=True, dnn_hidden_units=tuple(h["mlp_dims"]),
                  l2_reg_linear=h["l2_reg_linear"], l2_reg_embedding=h["l2_reg_embedding"],
                  l2_reg_dnn=h["l2_reg_dnn"], init_std=h["init_std"], seed=req["seed"],
                  dnn_dropout=h["dropout_rate"], dnn_activation="relu", dnn_use_bn=False,
                  task="binary", device="cpu")
  raise ValueError(f"model {req['model']!r} is not compared (din, deepfm)")


def setup(req: dict) -> dict:
  """The peer's best CPU settings, the training arrays, the model and its Adam.

  Sets torch.set_num_threads(req["threads"] or os.cpu_count()) and torch.set_flush_denormal
  (without it DeepCTR-Torch's Adam over the embedding tables slows down on denormal moments).

  Returns:
    {"model", "optim", "feature_index", "x_train", "y_train", "reinit" (dense layers
    re-initialised), "flush_denormal" (whether the CPU supports it)}.
  """
  import torch  # noqa: PLC0415
  from deepctr_torch.inputs import build_input_features  # noqa: PLC0415

  threads = req.get("threads") or os.cpu_count() or 1
  torch.set_num_threads(threads)  # the peer's best settings on this CPU (see --peer_threads)
  flush_denormal = torch.set_flush_denormal(True)
  torch.manual_seed(req["seed"])
  h = req["hparams"]
  columns = build_columns(req["spec"], h["embed_dim"])
  feature_index = build_input_features(columns)
  x_train = torch.from_numpy(build_matrix(req["data_dir"], "train", req["spec"], feature_index))
  y_train = torch.from_numpy(np.asarray(
      np.load(os.path.join(req["data_dir"], "train", "label.npy"), allow_pickle=False),
      np.float32))
  model = build_model(req, columns)
  reinit = lecun_reinit(model) if req.get("dense_init", "deepctr") == "lecun" else 0
  optim = torch.optim.Adam(model.parameters(), lr=h["learning_rate"],
                           betas=(h["adam_b1"], h["adam_b2"]), eps=h["adam_eps"])
  return {"model": model, "optim": optim, "feature_index": feature_index, "x_train": x_train,
          "y_train": y_train, "reinit": reinit, "flush_denormal": bool(flush_denormal)}


def train_step(model, optim, x, y):
  """One step of DeepCTR-Torch's `BaseModel.fit`; returns the summed BCE (a tensor)."""
  import torch.nn.functional as F  # noqa: PLC0415
  y_pred = model(x).squeeze(-1)
  optim.zero_grad()
  loss = F.binary_cross_entropy(y_pred, y, reduction="sum")  # as BaseModel.fit
  total = loss + model.get_regularization_loss() + model.aux_loss
  total.backward()
  optim.step()
  return loss


class BatchOrder:
  """The rows of each training batch, those of mian_jax.data.pipeline.TrainBatches (one
  permutation of the n rows per epoch from (seed, epoch), full batches only, sorted rows);
  tests/test_compare_deepctr.py checks the two agree. Written out here because the peer runs
  without mian_jax installed."""

  def __init__(self, n: int, batch_size: int, seed: int):
    self.n, self.batch_size, self.seed = n, batch_size, seed
    self.steps_per_epoch = n // batch_size
    self._epoch, self._perm = -1, np.empty(0, np.int64)

  def rows(self, step: int) -> np.ndarray:
    epoch, b = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
      self._epoch = epoch
    return np.sort(self._perm[b * self.batch_size:(b + 1) * self.batch_size])


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Rows of training batch `step` (`BatchOrder`)."""
  return BatchOrder(n, batch_size, seed).rows(step)


def versions() -> dict:
  """torch and deepctr-torch versions, and the torch threads in use."""
  import torch  # noqa: PLC0415
  import deepctr_torch  # noqa: PLC0415
  return {"torch_version": torch.__version__,
          "deepctr_torch_version": deepctr_torch.__version__,
          "torch_threads": torch.get_num_threads()}


def run(req: dict) -> dict:
  """Mode "train": trains for req["total_steps"] steps, then writes the predictions."""
  import torch  # noqa: PLC0415

  s = setup(req)
  model, optim, x_train, y_train = s["model"], s["optim"], s["x_train"], s["y_train"]
  h = req["hparams"]
  n, batch_size, total_steps = x_train.shape[0], h["batch_size"], req["total_steps"]
  model.train()
  start = time.perf_counter()
  order, loss_sum = BatchOrder(n, batch_size, req["seed"]), 0.0
  for step in range(total_steps):
    rows = torch.from_numpy(order.rows(step))
    loss = train_step(model, optim, x_train[rows], y_train[rows])
    loss_sum += loss.detach().item() / len(rows)
    if not math.isfinite(loss_sum):
      raise FloatingPointError(f"non-finite loss at step {step}")
  train_seconds = time.perf_counter() - start

  model.eval()
  predict_seconds = {}
  for split in req["predict_splits"]:
    t0 = time.perf_counter()
    x_split = torch.from_numpy(build_matrix(req["data_dir"], split, req["spec"],
                                            s["feature_index"]))
    parts = []
    with torch.no_grad():
      for i in range(0, x_split.shape[0], req["eval_batch_size"]):
        parts.append(model(x_split[i:i + req["eval_batch_size"]]).squeeze(-1).numpy())
    np.save(os.path.join(req["out_dir"], f"pred_{split}.npy"),
            np.concatenate(parts).astype(np.float32), allow_pickle=False)
    predict_seconds[split] = time.perf_counter() - t0
  return {
      "steps": total_steps,
      "train_seconds": train_seconds,
      "predict_seconds": predict_seconds,
      "mean_train_bce": loss_sum / max(total_steps, 1),
      "num_parameters": int(sum(p.numel() for p in model.parameters())),
      **versions(),
      "flush_denormal": s["flush_denormal"],
      "dense_layers_reinitialised": s["reinit"],
  }


def run_throughput(req: dict) -> dict:
  """Mode "throughput": the measurements of throughput.py's `measure`, for DeepCTR-Torch.

  Batches are those mian_jax takes (`batch_rows`, hparams.batch_size): step 0 for the first
  step, steps 1..8 (gathered beforehand, as mian_jax's device batches) in turn after it.

  - compile_s: the first training step. Torch compiles nothing; this is its first-call cost
    (lazy allocations, Adam's state), comparable to mian_jax's trace + compile + first run;
  - train_samples_per_s: steady state over req["seconds"] of `train_step`s (forward, BCE with
    reduction="sum" + regularisation loss + aux loss, backward, Adam step);
  - eval_samples_per_s: model.eval() forward passes under torch.no_grad() over
    req["eval_seconds"], after one untimed pass;
  - peak_rss_mb: this process's peak resident memory.
  """
  import resource  # noqa: PLC0415

  import torch  # noqa: PLC0415

  s = setup(req)
  model, optim, x_train, y_train = s["model"], s["optim"], s["x_train"], s["y_train"]
  n, batch_size, seed = x_train.shape[0], req["hparams"]["batch_size"], req["seed"]
  if n // batch_size == 0:
    raise ValueError(f"batch size {batch_size} exceeds the {n} training examples")
  batches = []
  for step in range(9):
    rows = torch.from_numpy(batch_rows(n, batch_size, seed, step))
    batches.append((x_train[rows], y_train[rows]))

  model.train()
  start = time.perf_counter()
  loss = train_step(model, optim, *batches[0])
  compile_s = time.perf_counter() - start

  steps, start = 0, time.perf_counter()
  while time.perf_counter() - start < req["seconds"]:
    loss = train_step(model, optim, *batches[1 + steps % 8])
    steps += 1
  train_rate = steps * batch_size / (time.perf_counter() - start)
  if not math.isfinite(loss.item()):
    raise FloatingPointError("non-finite training loss")

  model.eval()
  with torch.no_grad():
    model(batches[0][0])
    evaluated, start = 0, time.perf_counter()
    while time.perf_counter() - start < req["eval_seconds"]:
      model(batches[1 + evaluated % 8][0])
      evaluated += 1
    eval_rate = evaluated * batch_size / (time.perf_counter() - start)

  return {"impl": "deepctr_torch", "model": req["model"], "batch_size": batch_size,
          "optimizer": "torch.optim.Adam", "cpu_count": os.cpu_count(),
          "train_samples_per_s": train_rate, "eval_samples_per_s": eval_rate,
          "compile_s": compile_s, "train_steps": steps,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "num_parameters": int(sum(p.numel() for p in model.parameters())),
          **versions(), "flush_denormal": s["flush_denormal"],
          "dense_layers_reinitialised": s["reinit"]}


def summarise_calls(durations: list[float], batch_size: int) -> dict:
  """Latency p50 / p99 / mean (ms) and rows/s of timed calls (benchmarks/serving.py's
  `summarise`, written out here because the peer runs without mian_jax)."""
  d = np.asarray(durations, np.float64)
  return {"latency_p50_ms": 1e3 * float(np.percentile(d, 50)),
          "latency_p99_ms": 1e3 * float(np.percentile(d, 99)),
          "latency_mean_ms": 1e3 * float(d.mean()),
          "rows_per_s": batch_size * len(d) / float(d.sum()), "calls": len(d)}


def run_predict(req: dict) -> dict:
  """Mode "predict": the serving speed of DeepCTR-Torch's model on the valid split's rows.

  For each batch size B of req["batch_sizes"], the batches benchmarks/serving.py takes (rows
  (k * B + arange(B)) mod n of the valid split, at most req["distinct_batches"] of them) are
  scored by two calls, each req["warmup_calls"] times untimed, then timed call by call for
  req["seconds"] in req["rounds"] rounds that alternate them:

  - "predict": `model.predict({feature: array}, batch_size=B)`, DeepCTR-Torch's own API (a
    TensorDataset and DataLoader per call), NumPy in and out;
  - "forward": `model(torch.from_numpy(x))` under torch.no_grad() in eval mode, `.numpy()`:
    the bare forward pass a hand-written server would call.

  A timed call starts with the batch as NumPy arrays and ends with the scores as NumPy.
  Returns {"rows": [one per (call, batch size): latency p50 / p99 / mean ms, rows/s, calls,
  first_call_s], versions, threads}.
  """
  import resource  # noqa: PLC0415

  import torch  # noqa: PLC0415

  s = setup(req)
  model, index = s["model"], s["feature_index"]
  x_valid = build_matrix(req["data_dir"], "valid", req["spec"], index)
  n = x_valid.shape[0]
  model.eval()

  def as_features(x):
    return {name: x[:, start:end] for name, (start, end) in index.items()}

  calls = {
      "predict": lambda x: model.predict(as_features(x), batch_size=x.shape[0]),
      "forward": lambda x: model(torch.from_numpy(x)).squeeze(-1).numpy(),
  }
  rows = []
  with torch.no_grad():
    for batch_size in req["batch_sizes"]:
      count = max(1, min(req["distinct_batches"], n // batch_size))
      batches = [np.ascontiguousarray(x_valid[(k * batch_size + np.arange(batch_size)) % n])
                 for k in range(count)]
      first_call = {}
      for name, fn in calls.items():
        start = time.perf_counter()
        fn(batches[0])
        first_call[name] = time.perf_counter() - start
        for i in range(req["warmup_calls"] - 1):
          fn(batches[(i + 1) % count])
      durations = {name: [] for name in calls}
      for round_index in range(req["rounds"]):
        order = list(calls) if round_index % 2 == 0 else list(calls)[::-1]
        for name in order:
          end = time.perf_counter() + req["seconds"] / req["rounds"]
          i = len(durations[name])
          while time.perf_counter() < end or not durations[name]:
            batch = batches[i % count]
            start = time.perf_counter()
            calls[name](batch)
            durations[name].append(time.perf_counter() - start)
            i += 1
      for name in calls:
        rows.append({"call": name, "batch_size": batch_size, "distinct_batches": count,
                     "first_call_s": first_call[name],
                     **summarise_calls(durations[name], batch_size)})
  return {"impl": "deepctr_torch", "model": req["model"], "rows": rows,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "num_parameters": int(sum(p.numel() for p in model.parameters())), **versions()}


MODES = {"train": run, "throughput": run_throughput, "predict": run_predict}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--request", required=True,
                      help="request JSON from compare_deepctr.py or throughput.py")
  args = parser.parse_args()
  with open(args.request) as f:
    req = json.load(f)
  mode = req.get("mode", "train")
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
  result = MODES[mode](req)
  print("PEER_RESULT " + json.dumps(result), flush=True)
  sys.stderr.flush()
  # deepctr_torch starts a non-daemon thread at import that asks PyPI for its latest version;
  # without network it could keep the process alive, so leave without waiting for it.
  os._exit(0)


if __name__ == "__main__":
  main()
