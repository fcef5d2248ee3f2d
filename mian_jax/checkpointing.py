"""Orbax checkpoints under `<workdir>/checkpoints`, and the order in which a run resumes.

Resume order (written here once): the newest readable checkpoint in the workdir, else an older
readable one (an unreadable newer one is moved to `<workdir>/checkpoints_damaged/` with a
warning), else a fresh start from the config's seed.

Beside the newest `checkpoint.max_to_keep`, `<workdir>/checkpoints_best/` holds one checkpoint:
the step with the best validation AUC so far, so that the rotation never deletes it. The resumed
`meta` is the record of which step that is; `reconcile_best` makes the directory agree with it.

A checkpoint holds two items: `state` (params, optimizer state, step) and `meta`, a small JSON of
progress (epoch, examples seen, best validation metric, the data schema's fingerprint). The data
position is a pure function of the step (see mian_jax.data.pipeline), so nothing else is needed
for an exact resume.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from ml_collections import ConfigDict

from mian_jax.errors import DataError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def best_checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints_best")


def _manager(directory: str, max_to_keep: int, read_only: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not read_only,
      read_only=read_only,
      # A process killed mid-save leaves `<step>.orbax-checkpoint-tmp*`; remove it on start.
      cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def create_manager(workdir: str, checkpoint_config: ConfigDict,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The newest `checkpoint.max_to_keep` checkpoints, `<workdir>/checkpoints`."""
  return _manager(checkpoint_dir(workdir), checkpoint_config.max_to_keep, read_only)


def create_best_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  """The checkpoint of the best validation AUC, `<workdir>/checkpoints_best` (one step)."""
  return _manager(best_checkpoint_dir(workdir), 1, read_only)


def _state_tree(state) -> dict[str, Any]:
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def save(manager: ocp.CheckpointManager, state, meta: dict[str, Any]) -> None:
  """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
  step = int(meta["step"])
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)),
               force=True)


def reconcile_best(best_manager: ocp.CheckpointManager, state,
                   meta: dict[str, Any]) -> dict[str, Any]:
  """Makes `checkpoints_best` hold exactly the step that the resumed `meta` calls best.

  A best checkpoint newer than the resumed one was saved after the last regular checkpoint;
  training redoes those steps (identically) and saves it again, so it is deleted here. A
  missing best step is saved from `state` when that is the resumed step; otherwise it cannot
  be recovered (a workdir from before `checkpoints_best`): the best so far is forgotten with a
  warning, and selection starts again from the next validation.

  Returns `meta`, with `best_valid_auc` and `best_step` set to None in that last case.
  """
  best_step = meta.get("best_step")
  for step in best_manager.all_steps():
    if step != best_step:
      best_manager.delete(step)
  if best_step is None or best_step in best_manager.all_steps():
    return meta
  if best_step == int(state.step):
    save(best_manager, state, meta)
    return meta
  logging.warning("The best checkpoint (step %d, validation AUC %s) is not in %s; selection "
                  "starts again from the next validation", best_step, meta.get("best_valid_auc"),
                  best_manager.directory)
  return {**meta, "best_valid_auc": None, "best_step": None}


def _restore_step(manager, step: int, state):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  tree = restored["state"]
  return state.replace(params=tree["params"], opt_state=tree["opt_state"],
                       step=tree["step"]), dict(restored["meta"])


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}"


def restore(manager: ocp.CheckpointManager, state, step: int | None = None,
            workdir: str | None = None):
  """Restores into the structure (and shardings) of `state`.

  Args:
    manager: from `create_manager`.
    state: a freshly created TrainState, the template for shapes, dtypes and shardings.
    step: a specific step (an error if it is missing or unreadable); None for the resume
      order of the module docstring.
    workdir: where to move damaged checkpoints aside (only in resume mode; None: leave them).

  Returns:
    (state, meta), or None when there is no readable checkpoint.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise DataError(f"no checkpoint for step {step} in {manager.directory} "
                      f"(available: {sorted(steps) or 'none'})")
    try:
      return _restore_step(manager, step, state)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
      raise DataError(f"checkpoint {step} in {manager.directory} is unreadable "
                      f"({_one_line(e)})") from None
  damaged = []
  result = None
  for s in steps:
    try:
      result = _restore_step(manager, s, state)
      break
    except Exception as e:  # noqa: BLE001
      logging.warning("Checkpoint at step %d is damaged and is skipped (%s)", s, _one_line(e))
      damaged.append(s)
  if damaged and workdir is not None:
    _move_aside(manager, damaged, workdir)
  return result


def _move_aside(manager, steps, workdir):
  """Moves unreadable step directories out of the manager's way, so their steps can be saved."""
  if jax.process_index() == 0:
    target = os.path.join(workdir, "checkpoints_damaged")
    os.makedirs(target, exist_ok=True)
    for s in steps:
      source = os.path.join(str(manager.directory), str(s))
      if os.path.exists(source):
        dest = os.path.join(target, f"{s}-{int(time.time())}")
        shutil.move(source, dest)
        logging.warning("Moved damaged checkpoint %s to %s", source, dest)
  manager.reload()
