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

Integrity: no state with a NaN or infinite parameter or optimizer moment is ever saved (`save`
raises NonFiniteStateError instead). Once a save has landed, process 0 writes
`<step>/sha256sums.json`, the SHA-256 of every file of the step directory (`finalize`; `save`
calls it for the previous save, the loop once more before it closes the manager). A restore
checks it first: a file that differs makes the checkpoint damaged, handled like an unreadable
one. A step without the file (the process died between the save and the hashing) is restored
unverified. A restored state that is not finite is damaged too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from mian_jax.errors import DataError, NonFiniteStateError

# Inside each step directory; orbax ignores files there (it reads items from subdirectories)
# and deletes or moves it with its step.
CHECKSUM_FILE = "sha256sums.json"
_CHUNK_BYTES = 1 << 20

# Steps a manager saved in this process whose checksums are not written yet.
_unhashed: weakref.WeakKeyDictionary[ocp.CheckpointManager, set[int]] = (
    weakref.WeakKeyDictionary())


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


@jax.jit
def _all_finite(tree) -> jax.Array:
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.array(True)


def is_finite(state) -> bool:
  """Whether every float leaf of `state.params` and `state.opt_state` is finite.

  One jitted reduction over the (global, possibly sharded) arrays; its scalar result is
  replicated, so every process of a multi-process run gets the same answer.
  """
  result = _all_finite({"params": state.params, "opt_state": state.opt_state})
  return bool(np.asarray(result.addressable_data(0)))


def save(manager: ocp.CheckpointManager, state, meta: dict[str, Any]) -> None:
  """Saves asynchronously, after writing the checksums of the previous save (`finalize`).

  End with `close(manager)` (or `finalize(manager)`), so that the last save is hashed too.

  Raises:
    NonFiniteStateError: `state` holds a NaN or infinity; nothing is saved.
  """
  step = int(meta["step"])
  if not is_finite(state):
    last = manager.latest_step()
    where = (f"the last good checkpoint there is step {last}" if last is not None else
             "no checkpoint was written there")
    raise NonFiniteStateError(
        f"step {step}: the train state holds NaN or infinite parameters or optimizer state "
        f"and was NOT saved to {manager.directory}; {where} (lower train.learning_rate or "
        "check the data for extreme values)")
  finalize(manager)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)),
               force=True)
  _unhashed.setdefault(manager, set()).add(step)


def finalize(manager: ocp.CheckpointManager) -> None:
  """Waits for the manager's saves to land, then writes the checksum file of each step this
  process saved with it that is still on disk (files: process 0 only).

  Every process calls it (waiting is collective). Idempotent and cheap when nothing is
  pending; `save` and `restore` call it themselves.
  """
  manager.wait_until_finished()
  steps = _unhashed.pop(manager, set())
  if jax.process_index() != 0:
    return
  for step in sorted(steps):
    step_dir = _step_dir(manager, step)
    if os.path.isdir(step_dir):  # else rotated away or moved aside since
      write_checksums(step_dir)


def close(manager: ocp.CheckpointManager) -> None:
  """`finalize`, then `manager.close()`: how a run ends with a manager it saved with."""
  finalize(manager)
  manager.close()


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def _file_digests(step_dir: str) -> dict[str, str]:
  """{path relative to `step_dir`: sha256} of every file but the checksum file itself."""
  digests = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir).replace(os.sep, "/")
      if relative not in (CHECKSUM_FILE, CHECKSUM_FILE + ".tmp"):
        digests[relative] = _sha256(path)
  return digests


def write_checksums(step_dir: str) -> None:
  """Writes `<step_dir>/sha256sums.json` atomically (a killed writer leaves no partial file)."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump({"algorithm": "sha256", "files": _file_digests(step_dir)}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def verify_checksums(step_dir: str) -> bool:
  """Checks the files of a step directory against its checksum file.

  Files not listed are ignored (orbax reads only what it wrote before the hashing).

  Returns:
    True if every listed file matches; False if the directory has no checksum file.

  Raises:
    DataError: a listed file is missing or differs, or the checksum file is unreadable.
  """
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      recorded = dict(json.load(f)["files"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{CHECKSUM_FILE} is unreadable ({_one_line(e)})") from None
  for relative, expected in sorted(recorded.items()):
    file = os.path.join(step_dir, relative)
    if not os.path.isfile(file):
      raise DataError(f"{relative} is missing (listed in {CHECKSUM_FILE})")
    if _sha256(file) != expected:
      raise DataError(f"the sha256 of {relative} differs from {CHECKSUM_FILE}")
  return True


def _verify_step(manager: ocp.CheckpointManager, step: int) -> None:
  """Process 0 checks the step's checksums; every process raises DataError if they differ."""
  error = ""
  if jax.process_index() == 0:
    try:
      if not verify_checksums(_step_dir(manager, step)):
        logging.info("Checkpoint %s has no %s (the run stopped before writing it); restoring "
                     "it unverified", _step_dir(manager, step), CHECKSUM_FILE)
    except DataError as e:
      error = str(e)
  if jax.process_count() > 1:  # one verdict for all, or the processes would part ways
    if multihost_utils.broadcast_one_to_all(np.int32(bool(error))) and not error:
      error = "checksums differ (details in process 0's log)"
  if error:
    raise DataError(error)


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
  _verify_step(manager, step)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  tree = restored["state"]
  state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
  if not is_finite(state):
    raise DataError("the restored parameters or optimizer state hold NaN or infinite values")
  return state, dict(restored["meta"])


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}"


def restore(manager: ocp.CheckpointManager, state, step: int | None = None,
            workdir: str | None = None):
  """Restores into the structure (and shardings) of `state`.

  Args:
    manager: from `create_manager`.
    state: a freshly created TrainState, the template for shapes, dtypes and shardings.
    step: a specific step (an error if it is missing, unreadable or damaged); None for the
      resume order of the module docstring.
    workdir: where to move damaged checkpoints aside (only in resume mode; None: leave them).

  Returns:
    (state, meta), or None when there is no readable checkpoint.
  """
  finalize(manager)  # a save of this run lands and is hashed before it is read
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise DataError(f"no checkpoint for step {step} in {manager.directory} "
                      f"(available: {sorted(steps) or 'none'})")
    try:
      return _restore_step(manager, step, state)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
      raise DataError(f"checkpoint {step} in {manager.directory} is unreadable or damaged "
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
      source = _step_dir(manager, s)
      if os.path.exists(source):
        dest = os.path.join(target, f"{s}-{int(time.time())}")
        shutil.move(source, dest)
        logging.warning("Moved damaged checkpoint %s to %s", source, dest)
  manager.reload()
