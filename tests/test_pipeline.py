"""The prefetch thread of the training batches: closable, and counting only what it hands out."""

import itertools
import threading
import time
import types

import numpy as np

from mian_jax.data import pipeline


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name.startswith("prefetch") and t.is_alive()]


def _wait_until(condition, timeout=5.0):
  deadline = time.monotonic() + timeout
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.01)
  return condition()


def test_closing_an_endless_prefetcher_ends_its_thread():
  it = pipeline.prefetch_iterator(itertools.count(), 2)
  assert next(it) == 0
  assert _prefetch_threads()
  time.sleep(0.2)  # the worker fills the queue and waits on it
  it.close()
  assert not _prefetch_threads()


def test_rows_read_counts_only_batches_handed_out():
  n = 64
  columns = {"hist_len": np.zeros(n, np.int32), "label": np.zeros(n, np.float32)}
  features = types.SimpleNamespace(item_fields=(), behavior_fields=(), user_fields=(),
                                   context_fields=())
  schema = types.SimpleNamespace(features=features, size=lambda split: n,
                                 columns=lambda: dict.fromkeys(columns))
  batches = pipeline.TrainBatches(columns, schema, 8, seed=0, process_index=1, process_count=2)
  read_ahead = []
  it = batches.iterate(0, 1000, prefetch=3, transform=lambda b: read_ahead.append(1) or b)
  for _ in range(2):
    assert next(it)["label"].shape == (4,)
  assert _wait_until(lambda: len(read_ahead) >= 4)  # gathered ahead, not handed out
  it.close()  # an early stop
  assert batches.rows_read == 2 * 4
  assert not _prefetch_threads()
