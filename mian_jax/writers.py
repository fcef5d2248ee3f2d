"""Metric writers (TensorBoard events and a JSON-lines file, through TensorBoard's TF-free
writer: clu's import TensorFlow, docs/toolchain.md), atomic JSON and text writes."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from tensorboard.summary import Writer as _EventWriter

from mian_jax import fileio


class MetricWriter:
  """clu's writer interface on process 0: scalars to `<logdir>` (TensorBoard) and
  `<logdir>/metrics.jsonl` (non-finite as null). A resumed run passes its step: later rows and
  the last report's test rows, about to be written again, are dropped first."""

  def __init__(self, logdir: str, resume_step: int | None = None):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, "metrics.jsonl")
    if resume_step is not None and os.path.isfile(path):
      drop_rows_after(path, resume_step)
    self._events = _EventWriter(logdir)
    self._jsonl = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    record = {"step": int(step), "time": time.time()}
    for name, value in scalars.items():
      self._events.add_scalar(name, float(value), step=step)
      record[name] = float(value) if math.isfinite(value) else None
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_hparams(self, hparams: Mapping[str, object]) -> None:
    if self._active:
      fileio.write_text_atomic(os.path.join(os.path.dirname(self._jsonl.name), "hparams.json"),
                               json.dumps(dict(hparams), indent=2, sort_keys=True, default=str))

  def close(self) -> None:
    if self._active:
      self._events.close()
      self._jsonl.close()
      self._active = False


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites a metrics.jsonl (atomically) without the rows after `step`, those with a "test/"
  key, and a torn line. Returns how many were dropped."""
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
      if row["step"] <= step and not any(k.startswith("test/") for k in row):
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      continue  # a line torn by a kill mid-write
  if len(kept) != len(lines):
    fileio.write_text_atomic(path, "".join(kept))
  return len(lines) - len(kept)


def read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics.jsonl file, null read as NaN."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: math.nan if v is None else v for k, v in row.items()} for row in rows]


def write_text_atomic(path: str, text: str) -> None:
  """`fileio.write_text_atomic` on process 0 only."""
  if jax.process_index() == 0:
    fileio.write_text_atomic(path, text)


def write_json_atomic(path: str, content: dict, warn: bool = True) -> None:
  """Strict JSON, atomically on process 0; a non-finite number as null (warned if `warn`)."""
  write_text_atomic(path, json.dumps(_finite_or_null(content, path if warn else ""), indent=2,
                                     sort_keys=True, allow_nan=False))


def _finite_or_null(value, path: str, key: str = ""):
  if isinstance(value, dict):
    return {k: _finite_or_null(v, path, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v, path, key) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    if path:
      logging.warning("%s: %s is %s, written as null", path, key, value)
    return None
  return value


def hms(seconds: float) -> str:
  """A duration as HH:MM:SS ("?" when unknown): progress lines and ETAs."""
  return time.strftime("%H:%M:%S", time.gmtime(max(seconds, 0))) if math.isfinite(seconds) else "?"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   numeric: Sequence[bool] | None = None, missing: str = "") -> str:
  """A Markdown table: floats with 4 decimals (non-finite: `missing`), `numeric` right-aligned."""
  numeric = numeric or [False] * len(headers)

  def cell(value):
    if isinstance(value, float):
      value = missing if not math.isfinite(value) else f"{value:.4f}"
    return str(value).replace("|", "\\|")

  lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"
