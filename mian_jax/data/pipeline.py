"""Batches from a prepared split: deterministic, resumable, and sharded by process.

Training order is a pure function of (seed, step): epoch e = step // steps_per_epoch is a fresh
permutation drawn from (seed, e), and step s reads rows [b * B, (b + 1) * B) of it. A resumed run
therefore needs only the step to continue exactly where it stopped. Each process reads only its
own slice of each global batch (rows [p * B / P, (p + 1) * B / P)), so no host holds all data.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping

import numpy as np

from mian_jax.data.schema import Schema
from mian_jax.errors import ConfigError

Batch = dict  # nested dict of numpy arrays, see `gather_batch`


def gather_batch(columns: Mapping[str, np.ndarray], schema: Schema,
                 rows: np.ndarray) -> Batch:
  """Reads `rows` of a split into the nested batch the models take.

  Returns:
    {"item": {name: [B]}, "hist": {name: [B, T]}, "hist_len": [B],
     "user": {name: [B]}, "context": {name: [B]}, "label": [B], "weight": [B]}
  """
  f = schema.features
  take = lambda name: np.asarray(columns[name][rows])  # noqa: E731
  return {
      "item": {x.name: take(f"item.{x.name}") for x in f.item_fields},
      "hist": {name: take(f"hist.{name}") for name in f.behavior_fields},
      "hist_len": take("hist_len"),
      "user": {x.name: take(f"user.{x.name}") for x in f.user_fields},
      "context": {x.name: take(f"context.{x.name}") for x in f.context_fields},
      "label": take("label"),
      "weight": np.ones(len(rows), np.float32),
  }


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
    self._columns, self._schema = columns, schema
    self.num_examples = schema.size("train")
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = self.num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f"train.batch_size={global_batch_size} exceeds the "
                        f"{self.num_examples} training examples")
    self._seed = seed
    self._slice = local_slice(global_batch_size, process_index, process_count)
    self._epoch, self._perm = -1, np.empty(0, np.int64)
    self.rows_read = 0  # training rows this process has gathered (`batch`)

  def rows(self, step: int) -> np.ndarray:
    """Row indices of this process's part of global batch `step`: its slice of the global
    batch's rows, sorted (for mmap locality) before slicing, so that the global batch is laid
    out over the devices the same way whatever the number of processes."""
    epoch, b = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(self.num_examples)
      self._epoch = epoch
    rows = np.sort(self._perm[b * self.global_batch_size:(b + 1) * self.global_batch_size])
    return rows[self._slice]

  def batch(self, step: int) -> Batch:
    rows = self.rows(step)
    self.rows_read += len(rows)
    return gather_batch(self._columns, self._schema, rows)

  def iterate(self, start_step: int, end_step: int, prefetch: int = 2,
              transform=None) -> Iterator[Batch]:
    """Batches for steps [start_step, end_step), read ahead in a background thread.

    `transform` (e.g. the copy to the devices) runs in that thread too, so that a step's
    batch is on the device before the step asks for it.
    """
    transform = transform or (lambda batch: batch)
    return prefetch_iterator((transform(self.batch(s)) for s in range(start_step, end_step)),
                             prefetch)


def eval_batches(columns: Mapping[str, np.ndarray], schema: Schema, split: str,
                 global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[Batch, np.ndarray]]:
  """Every example of `split` once, in order, as fixed-size batches (one compiled shape).

  The last global batch is padded with copies of row 0 whose `weight` is 0. Yields
  (batch, rows), where rows are this process's row indices and -1 marks padding.
  """
  n = schema.size(split)
  part = local_slice(global_batch_size, process_index, process_count)
  for start in range(0, n, global_batch_size):
    rows = np.arange(start, start + global_batch_size)[part]
    rows = np.where(rows < n, rows, -1)
    batch = gather_batch(columns, schema, np.maximum(rows, 0))
    batch["weight"] = (rows >= 0).astype(np.float32)
    yield batch, rows


def prefetch_iterator(iterator: Iterator, size: int) -> Iterator:
  """Runs `iterator` `size` items ahead in a daemon thread; re-raises its errors."""
  if size <= 0:
    yield from iterator
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      q.put(e)
    q.put(done)

  threading.Thread(target=worker, daemon=True).start()
  while (item := q.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item
