"""Batches from a prepared split, deterministic, resumable and sharded by process: epoch
e = step // steps_per_epoch is a permutation drawn from (seed, e), and step s reads its rows
[b * B, (b + 1) * B), so a resumed run needs only the step; each process reads its slice."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mian_jax.data.schema import Schema
from mian_jax.errors import ConfigError


def nest(columns: Mapping[str, Any]) -> dict:
  """{"item.x": a, "hist_len": l} -> {"item": {"x": a}, "hist": {}, ..., "hist_len": l}."""
  batch = {group: {} for group in ("item", "hist", "user", "context")}
  for name, value in columns.items():
    group, dot, field = name.rpartition(".")
    (batch[group] if dot else batch)[field] = value
  return batch


def gather_batch(columns: Mapping[str, np.ndarray], schema: Schema, rows: np.ndarray) -> dict:
  """`rows` of a split as the models' batch: {"item"|"user"|"context": {name: [B]}, "hist": {name:
  [B, T]}, "hist_len", "label", "weight": [B]}."""
  batch = nest({name: np.asarray(columns[name][rows]) for name in schema.columns()
                if name != "group_id" and not name.startswith("extra.")})
  batch["weight"] = np.ones(len(rows), np.float32)
  return batch


def local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size % process_count:
    raise ConfigError(f"batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes")
  per_process = global_batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


class TrainBatches:
  """Training batches addressed by step; see the module docstring for the order."""

  def __init__(self, columns: Mapping[str, np.ndarray], schema: Schema, global_batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    self._columns, self._schema, self._seed = columns, schema, seed
    self.num_examples = schema.size("train")
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f"train.batch_size={global_batch_size} exceeds the "
                        f"{self.num_examples} training examples")
    self._slice = local_slice(global_batch_size, process_index, process_count)
    self._epoch, self._perm = -1, np.empty(0, np.int64)
    self.rows_read = 0  # training rows this process's `iterate` has handed out

  def rows(self, step: int) -> np.ndarray:
    """This process's row indices of global batch `step`: the global batch's rows sorted (mmap
    locality), then sliced, so the devices get the same rows whatever the process count."""
    epoch, b = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(self.num_examples)
      self._epoch = epoch
    rows = np.sort(self._perm[b * self.global_batch_size:(b + 1) * self.global_batch_size])
    return rows[self._slice]

  def batch(self, step: int) -> dict:
    return gather_batch(self._columns, self._schema, self.rows(step))

  def iterate(self, start_step: int, end_step: int, prefetch: int = 2,
              transform=None) -> Iterator[dict]:
    """Batches of steps [start_step, end_step), `transform`ed `prefetch` steps ahead (a thread)."""
    transform = transform or (lambda batch: batch)
    ahead = prefetch_iterator((transform(self.batch(s)) for s in range(start_step, end_step)),
                              prefetch)
    with contextlib.closing(ahead):
      for batch in ahead:
        self.rows_read += self._slice.stop - self._slice.start
        yield batch


def eval_batches(columns: Mapping[str, np.ndarray], schema: Schema, split: str,
                 global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[dict, np.ndarray]]:
  """Every example of `split` once, in order, as fixed-size batches (one compiled shape), the
  last padded with copies of row 0 of `weight` 0: (batch, this process's rows, -1 = padding)."""
  n = schema.size(split)
  part = local_slice(global_batch_size, process_index, process_count)
  for start in range(0, n, global_batch_size):
    rows = np.arange(start, start + global_batch_size)[part]
    rows = np.where(rows < n, rows, -1)
    batch = gather_batch(columns, schema, np.maximum(rows, 0))
    batch["weight"] = (rows >= 0).astype(np.float32)
    yield batch, rows


def prefetch_iterator(iterator: Iterator, size: int) -> Iterator:
  """Runs `iterator` `size` items ahead in a "prefetch" thread; re-raises its errors. Closing
  this generator cancels the items not started and joins the thread."""
  if size <= 0:
    yield from iterator
    return
  done = object()
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
  ahead = collections.deque(pool.submit(next, iterator, done) for _ in range(size))
  try:
    while (item := ahead.popleft().result()) is not done:
      ahead.append(pool.submit(next, iterator, done))
      yield item
  finally:
    pool.shutdown(cancel_futures=True)
