"""The training loop: `train_and_evaluate(config, workdir)` trains (or resumes) a run, validates
it, keeps its best step and reports it (docs/training.md)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from mian_jax import checkpointing
from mian_jax import config_checks
from mian_jax import evaluate
from mian_jax import sharding
from mian_jax import steps
from mian_jax import workdir as workdir_lib
from mian_jax import writers
from mian_jax.errors import ConfigError, NonFiniteLossError, Preempted


def improves(auc: float, best: float | None) -> bool:
  """Whether a validation AUC beats the best so far (a tie keeps the earlier step; NaN never)."""
  return math.isfinite(auc) and (best is None or auc > best)


class StopSignals:
  """SIGTERM and SIGINT as a request to stop after the current step (a second signal gets the
  previous handler); several processes agree every `sync_every` steps."""

  def __init__(self, sync_every: int):
    self.sync_every, self.signum, self._previous = sync_every, 0, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self.__exit__()  # a second signal gets the previous handler
    logging.warning("Received %s: saving a checkpoint after this step, then stopping",
                    signal.Signals(signum).name)

  def requested(self, step: int) -> int:
    """The signal number to stop for (0: none), the same on every process."""
    if jax.process_count() == 1:
      return self.signum
    if step % self.sync_every:
      return 0
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


def closing_line(workdir: str, results: dict[str, dict[str, Any]]) -> str:
  split = "test" if "test" in results else "valid"  # valid only with eval.final_test=False
  shown = results[split]
  return (f"Done: {split} AUC {shown['auc']:.4f} at step {shown['step']} ({shown['selected']}). "
          f"Metrics: {os.path.join(workdir, 'eval')}; checkpoints: "
          f"{checkpointing.checkpoint_dir(workdir)} (best: "
          f"{checkpointing.checkpoint_dir(workdir, best=True)}); TensorBoard: "
          f"{os.path.join(workdir, 'metrics')}; predictions: python -m mian_jax.evaluate "
          f"--workdir={workdir} --step=best --predictions")


def total_train_steps(train_config: ConfigDict, steps_per_epoch: int) -> int:
  """`train.num_train_steps`, or `train.num_epochs` of the training split (ConfigError if 0)."""
  if train_config.num_train_steps > 0:
    return train_config.num_train_steps
  total = int(train_config.num_epochs * steps_per_epoch)
  if total < 1:
    raise ConfigError(f"config.train.num_epochs={train_config.num_epochs:g} of "
                      f"{steps_per_epoch} steps per epoch is 0 steps; train at least one step")
  return total


def validation_every(train_config: ConfigDict, steps_per_epoch: int) -> int:
  """`train.eval_every_steps`, or `train.eval_every_epochs` of an epoch (at least 1 step)."""
  epochs = train_config.eval_every_epochs
  return max(1, round(epochs * steps_per_epoch)) if epochs > 0 else train_config.eval_every_steps


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  """Trains (resuming from `workdir`), validates and reports: {"valid", "test": metrics of the
  reported step, with "step", "selected", "best_step", "best_valid_auc", "last_step"}."""
  config_checks.check_config(config, jax.device_count())
  workdir = os.path.abspath(workdir)
  workdir_lib.check_workdir_path(workdir)
  with workdir_lib.hold(workdir):  # around the checkpoint managers too (workdir.py says why)
    workdir_lib.check_rerun(workdir, config.to_dict())
    run = steps.setup(config)
    config_checks.check_validation_split(config, run.data_dir)
    for split in ("valid", "test"):  # a corrupt evaluation split fails now, not after training
      run.split(split)
    loop = Loop(run, workdir)
    try:
      return loop.train_and_report()
    finally:  # an async save in flight must land, also when training stops on an error
      loop.close()


class Loop:
  """The training loop of a `steps.Run` in `workdir`. `meta`: saved in every checkpoint
  (progress, best step and AUC, the data's identity); `pending`: the train metrics since the last
  log line; `validated`: this process's validations of the last and the best step."""

  def __init__(self, run: steps.Run, workdir: str):
    self.run, self.config, self.workdir = run, run.config, workdir
    self.manager = checkpointing.create_manager(workdir, run.config.checkpoint)
    self.best_manager = checkpointing.create_manager(workdir, run.config.checkpoint, best=True)
    self.meta: dict[str, Any] = {"best_valid_auc": None, "best_step": None, "evals_since_best": 0}
    self.writer, self.last_saved, self.valid_rows, self.per_epoch = None, None, None, 1
    self.pending, self.validated = [], {}

  def close(self) -> None:
    for manager in (self.manager, self.best_manager):
      checkpointing.finalize(manager)  # also writes the checksums of its last saves
      manager.close()
    if self.writer is not None:
      self.writer.close()

  def restore(self):
    """The newest good checkpoint of the workdir (`meta` becomes its), else the fresh state;
    OtherRunError, before any array is read, for a checkpoint of another run."""
    restored = checkpointing.restore(self.manager, self.run.state, workdir=self.workdir,
                                     identity=checkpointing.identity(self.run))
    state, meta = restored or (self.run.state, {})
    self.meta.update(meta)
    self.last_saved = int(state.step) if meta else None
    self.meta.update(checkpointing.reconcile_best(self.best_manager, state, self.meta))
    return state

  def progress(self, step: int) -> dict[str, Any]:
    return dict(step=step, epoch=step // self.per_epoch,
                examples_seen=step * self.config.train.batch_size,
                **checkpointing.identity(self.run))

  def check_pending(self, step: int) -> list[dict[str, float]]:
    """The `pending` metrics; NonFiniteLossError if a loss is non-finite or its cross-entropy
    exceeds `train.max_bce` (a diverged run: every later prediction saturates)."""
    history, max_bce = jax.device_get(self.pending), self.config.train.max_bce
    for m in history:
      finite = all(math.isfinite(v) for v in m.values())
      if finite and m["bce"] <= max_bce:
        continue
      where = (f"the last good checkpoint is step {self.last_saved}"
               if self.last_saved is not None else "no checkpoint was written")
      what = (f"non-finite loss {m}" if not finite else
              f"cross-entropy {m['bce']:.4g} above train.max_bce={max_bce:g} (diverged)")
      raise NonFiniteLossError(
          f"{what} by step {step}; training stopped and {where} "
          "(lower train.learning_rate or check the data for extreme values)")
    return history

  def stopped_early(self) -> bool:
    """Whether `train.early_stopping_patience` validations in a row gave no better AUC."""
    return 0 < self.config.train.early_stopping_patience <= self.meta["evals_since_best"]

  def save(self, state, step: int) -> None:
    self.check_pending(step)
    self.meta.update(self.progress(step))
    # The best checkpoint lands first, so no saved meta names a best step that is not on disk.
    checkpointing.finalize(self.best_manager)
    checkpointing.save(self.manager, state, self.meta)
    self.last_saved = step

  def validate(self, state, step: int) -> None:
    self.check_pending(step)  # never save a bad best
    valid = evaluate.evaluate_split(self.run, state, "valid", step, self.writer,
                                    rows=self.valid_rows)
    self.validated = {s: v for s, v in self.validated.items() if s == self.meta["best_step"]}
    self.validated[step] = valid
    if improves(valid["auc"], self.meta["best_valid_auc"]):
      self.meta.update(best_valid_auc=valid["auc"], best_step=step, evals_since_best=0)
      checkpointing.save(self.best_manager, state, {**self.meta, **self.progress(step)})
    else:
      self.meta["evals_since_best"] += 1

  def log_progress(self, step: int, total_steps: int, seconds: float) -> None:
    """Logs and writes the mean train metrics of the `pending` steps, then clears them."""
    history = self.check_pending(step)
    steps_per_second = len(history) / max(seconds, 1e-9)
    summary = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
    summary["samples_per_second"] = steps_per_second * self.config.train.batch_size
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
    logging.info("step %d/%d | loss %.4f | %.0f samples/s | ETA %s", step, total_steps,
                 summary["loss"], summary["samples_per_second"],
                 writers.hms((total_steps - step) / steps_per_second))
    self.pending = []

  def header(self, state, start_step: int, total_steps: int) -> str:
    """The few lines a run logs before its first progress line."""
    config, workdir, per_epoch = self.config, self.workdir, self.per_epoch
    num_params = int(parameter_overview.count_parameters(state.params))
    examples = ", ".join(f"{s} {n:,}" for s, n in self.run.schema.num_examples)
    if start_step >= total_steps > 0:
      span = (f"already at step {start_step:,}, at or past the budget of {total_steps:,} "
              "steps: nothing to train, evaluating")
    else:
      epochs = total_steps / per_epoch
      span = (f"steps {start_step:,} -> {total_steps:,} ({epochs:.3g} "
              f"epoch{'' if epochs == 1 else 's'} of {per_epoch:,})")
    return "\n".join([
        f"Run in {workdir} ({'resumed' if start_step else 'new'}); config: "
        f"{workdir_lib.config_path(workdir)}",
        f"  model {config.model.name}: {num_params:,} parameters (table: "
        f"{os.path.join(workdir, 'parameters.txt')})",
        f"  data {config.data.source}: {self.run.data_dir} ({examples} examples)",
        f"  train {span}; global batch {config.train.batch_size} on {jax.device_count()} "
        f"device(s); validation every {validation_every(config.train, per_epoch):,}, "
        f"checkpoint every {config.checkpoint.every_steps:,} steps",
    ])

  def train_and_report(self) -> dict[str, dict[str, Any]]:
    run, config, workdir = self.run, self.config, self.workdir
    batches = run.train_batches()
    self.per_epoch = batches.steps_per_epoch
    total_steps = total_train_steps(config.train, self.per_epoch)
    eval_every = validation_every(config.train, self.per_epoch)
    if config.eval.periodic_valid_examples > 0:  # whole users, drawn from `train.seed`
      group_id = run.split("valid")["group_id"]
      self.valid_rows = evaluate.valid_subsample(
          np.asarray(group_id), config.eval.periodic_valid_examples, config.train.seed)
    state = self.restore()
    start_step = int(state.step)
    if self.stopped_early():
      logging.info("Stopped early at step %d (best validation AUC %s at step %s); not "
                   "training further", start_step, self.meta["best_valid_auc"],
                   self.meta["best_step"])
      total_steps = min(total_steps, start_step)

    self.writer = writers.MetricWriter(os.path.join(workdir, "metrics"), resume_step=start_step)
    if start_step == 0:
      self.writer.write_hparams(config.to_dict())
    writers.write_text_atomic(os.path.join(workdir, "parameters.txt"),
                              parameter_overview.get_parameter_overview(state.params) + "\n")
    writers.write_json_atomic(workdir_lib.config_path(workdir), config.to_dict())
    logging.info("%s", self.header(state, start_step, total_steps))

    rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 1)  # not init's key
    t_window = time.perf_counter()
    device_batches = batches.iterate(
        start_step, total_steps, transform=lambda b: sharding.pack_to_global(b, run.mesh))
    # Closing the batches stops their prefetch thread on every way out of the loop.
    with StopSignals(config.train.log_every_steps) as signals, contextlib.closing(device_batches):
      for step, batch in zip(range(start_step + 1, total_steps + 1), device_batches):
        state, step_metrics = run.train_step(state, batch, rng)
        self.pending.append(step_metrics)
        last = step == total_steps
        if step % config.train.log_every_steps == 0 or last:
          self.log_progress(step, total_steps, time.perf_counter() - t_window)
          t_window = time.perf_counter()
        if step % eval_every == 0 or last:
          self.validate(state, step)
          t_window = time.perf_counter()  # evaluation time is not training throughput
        stop = self.stopped_early()
        signum = signals.requested(step)
        if step % config.checkpoint.every_steps == 0 or last or stop or signum:
          self.save(state, step)
        if signum:  # `close` lands the save
          raise Preempted(signum, step, workdir)
        if stop:
          logging.info("Early stopping at step %d: no better validation AUC in %d "
                       "evaluations (best %s at step %s)", step,
                       config.train.early_stopping_patience,
                       self.meta["best_valid_auc"], self.meta["best_step"])
          break

    logging.info("Process %d of %d read %d training rows (its part of %d steps of %d)",
                 jax.process_index(), jax.process_count(), batches.rows_read,
                 int(state.step) - start_step, config.train.batch_size)
    if self.meta["best_step"] is None and int(state.step) not in self.validated:
      self.validate(state, int(state.step))  # best step unknown so far
    return self.report(state)

  def report(self, state) -> dict[str, dict[str, Any]]:
    """Evaluates the step `eval.report_step` selects on valid and (`eval.final_test`) test, reusing
    this process's whole-split validation of it; writes `eval/<split>_metrics.json`."""
    meta, last_step, selected = self.meta, int(state.step), self.config.eval.report_step
    if selected == "best" and meta["best_step"] is None:
      logging.warning("No validation AUC was ever defined; reporting the last step")
      selected = "last"
    if selected == "best" and meta["best_step"] != last_step:
      state, _ = checkpointing.restore(self.best_manager, state, step=meta["best_step"])
    step = int(state.step)
    logging.info("Reporting step %d (%s; best validation AUC %s at step %s)", step, selected,
                 meta["best_valid_auc"], meta["best_step"])
    selection = {"selected": selected, "best_step": meta["best_step"],
                 "best_valid_auc": meta["best_valid_auc"], "last_step": last_step}
    results, reported = {}, {}  # reported: this report's scalars (one row; dropped on resume)
    for split in ("valid", "test") if self.config.eval.final_test else ("valid",):
      known = self.validated.get(step) if split == "valid" else None
      if known is not None and not known.get("subsample"):
        result = known  # its valid scalars were written when it was validated
      else:
        result = evaluate.evaluate_split(self.run, state, split, step)
        if split == "test" or self.valid_rows is not None:  # else written when validated
          reported.update(evaluate.scalars(split, result))
      results[split] = {**result, **selection}
      evaluate.write_metrics(self.workdir, split, results[split], final=True)
    if reported:
      self.writer.write_scalars(step, reported)
    logging.info("%s", closing_line(self.workdir, results))
    return results
