"""Orbax checkpoints under `<workdir>/checkpoints` (the best validation step in
`checkpoints_best/`), checked by checksum and against the run before any array is read.

Resume order (written here once): the newest readable checkpoint in the workdir, else an older
readable one (an unreadable newer one is moved to `<workdir>/checkpoints_damaged/`), else a fresh
start from the config's seed. docs/training.md, "Checkpoints and resume", says more.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import weakref
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from ml_collections import ConfigDict

from mian_jax import sharding
from mian_jax.errors import (DataError, NonFiniteStateError, describe, file_system_error,
                             first_of)
from mian_jax.fileio import sha256_file, sha256_files, write_text_atomic

# Inside each step directory: orbax ignores it, and deletes or moves it with its step.
CHECKSUM_FILE = "sha256sums.json"

# How an embedding table's parameter path ends (models/layers.py names tables `embed_<field>`).
_TABLE_PATH = re.compile(r"params/.*embed_(?P<field>[^/]+)/embedding$")


class OtherRunError(DataError):
  """A readable checkpoint of another run (other data, shapes): not damage, never moved aside."""


# Steps a manager saved in this process whose checksums are not written yet.
_unhashed: weakref.WeakKeyDictionary[ocp.CheckpointManager, set[int]] = (
    weakref.WeakKeyDictionary())


def checkpoint_dir(workdir: str, best: bool = False) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints_best" if best else "checkpoints")


def create_manager(workdir: str, checkpoint_config: ConfigDict, read_only: bool = False,
                   best: bool = False) -> ocp.CheckpointManager:
  """The manager of `checkpoint_dir(workdir, best)`: `checkpoint.max_to_keep` steps (`best`: 1)."""
  # cleanup_tmp_directories: a process killed mid-save leaves `<step>.orbax-checkpoint-tmp*`.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1 if best else checkpoint_config.max_to_keep, create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir, best), options=options,
                               item_names=("state", "meta"))


def identity(run) -> dict[str, Any]:
  """What a checkpoint's meta must agree with to continue `run` (a `steps.Run`): its data's
  schema fingerprint and checksum ("": not verified, not compared)."""
  return {"schema_fingerprint": run.schema.fingerprint(),
          "data_checksum": run.data_checksum or None}


def _state_tree(state) -> dict[str, Any]:
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.array([True] + [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
                             if jnp.issubdtype(x.dtype, jnp.inexact)]).all()


def is_finite(state) -> bool:
  """Whether every float leaf of params and optimizer state is finite (same on every process)."""
  return bool(np.asarray(_all_finite((state.params, state.opt_state)).addressable_data(0)))


def save(manager: ocp.CheckpointManager, state, meta: dict[str, Any]) -> None:
  """Saves asynchronously, after `finalize` of the previous save (end with `finalize`, so that
  the last one is hashed too); NonFiniteStateError, saving nothing, for a non-finite state."""
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
  with _named_file_system_error(manager):
    manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)))
  _unhashed.setdefault(manager, set()).add(step)


@contextlib.contextmanager
def _named_file_system_error(manager: ocp.CheckpointManager) -> Iterator[None]:
  """A full or read-only disk's error as an OSError naming the checkpoint directory, for
  `cli.run_or_exit` to say in one line (not orbax's traceback)."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - orbax wraps the OSError
    if (cause := file_system_error(e)) is None:
      raise
    raise OSError(cause.errno, cause.strerror, cause.filename or str(manager.directory)) from None


def finalize(manager: ocp.CheckpointManager) -> None:
  """Waits for the manager's saves to land (collective), then process 0 writes the checksum
  file of each step this process saved that is still on disk. Cheap when nothing is pending."""
  steps = _unhashed.pop(manager, set())
  with _named_file_system_error(manager):  # a background save failed
    manager.wait_until_finished()
  for step in sorted(steps) if jax.process_index() == 0 else []:
    step_dir = _step_dir(manager, step)
    if os.path.isdir(step_dir):  # else rotated away or moved aside since
      files = sha256_files(step_dir, skip=CHECKSUM_FILE)
      write_text_atomic(os.path.join(step_dir, CHECKSUM_FILE),
                        json.dumps({"algorithm": "sha256", "files": files}, indent=1), fsync=True)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def verify_checksums(step_dir: str) -> bool:
  """True if every file the step's checksum file lists matches (others are ignored), False if
  it has none; DataError if a listed file is missing or differs, or the file is unreadable."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      recorded = dict(json.load(f)["files"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{CHECKSUM_FILE} is unreadable ({describe(e)})") from None
  for relative, expected in sorted(recorded.items()):
    file = os.path.join(step_dir, relative)
    if not os.path.isfile(file):
      raise DataError(f"{relative} is missing (listed in {CHECKSUM_FILE})")
    if sha256_file(file) != expected:
      raise DataError(f"the sha256 of {relative} differs from {CHECKSUM_FILE}")
  return True


def reconcile_best(best_manager: ocp.CheckpointManager, state,
                   meta: dict[str, Any]) -> dict[str, Any]:
  """`meta`, `checkpoints_best` made to hold exactly the step it calls best: a newer best step
  is deleted (training redoes it); a missing one is saved from `state` if that is the resumed
  step, else forgotten with a warning (best_step, best_valid_auc None: selection restarts)."""
  best_step = meta["best_step"]
  for step in best_manager.all_steps():
    if step != best_step:
      best_manager.delete(step)
  if best_step is None or best_step in best_manager.all_steps():
    return meta
  if best_step == int(state.step):
    save(best_manager, state, meta)
    return meta
  logging.warning("The best checkpoint (step %d, validation AUC %s) is not in %s; selection "
                  "starts again from the next validation", best_step, meta["best_valid_auc"],
                  best_manager.directory)
  return {**meta, "best_valid_auc": None, "best_step": None}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{path as orbax names it on disk ("params/.../embed_item_id/embedding"): shape} of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(x, "shape", ()))
          for path, x in leaves}


def other_run_differences(meta: dict[str, Any], identity: dict[str, Any],
                          here: dict[str, tuple[int, ...]],
                          saved: dict[str, tuple[int, ...]]) -> list[str]:
  """What makes a checkpoint another run's: parameters missing or of another shape (`here`,
  `saved`: {path name: shape}), `identity` values its `meta` records otherwise (None: not
  compared), then, only if the parameters agree, the rest of the state's differences."""
  def tree_differences(params: bool):
    out = []
    for name in sorted(n for n in set(here) | set(saved) if n.startswith("params/") == params):
      if name not in saved:
        out.append(f"the checkpoint has no {name}")
      elif name not in here:
        out.append(f"the checkpoint has {name}, this model has not")
      elif here[name] != saved[name]:
        a, b, table = here[name], saved[name], _TABLE_PATH.search(name)
        rows = table and len(a) == len(b) == 2 and a[1] == b[1]
        out.append(f"table {table['field']} has {a[0]} rows for this data, {b[0]} in the "
                   "checkpoint" if rows else f"{name} has shape {a} here, {b} in the checkpoint")
    return out

  params = tree_differences(True)
  recorded_otherwise = [
      f"{key.replace('_', ' ')} {str(value)[:12]} for this data, {str(meta[key])[:12]} in the "
      "checkpoint" for key, value in identity.items()
      if value is not None and meta.get(key) is not None and meta[key] != value]
  return params + recorded_otherwise + ([] if params else tree_differences(False))


def _restore_step(manager, step: int, state, identity: dict[str, Any]):
  """Checksums (damage), then meta, identity and shapes (another run: OtherRunError, no array
  read, the saved shapes from orbax's metadata files), then the arrays."""
  error, step_dir = "", _step_dir(manager, step)
  try:  # process 0 checks the checksums; every process raises if they differ
    if jax.process_index() == 0 and not verify_checksums(step_dir):
      logging.info("Checkpoint %s has no %s (the run stopped before writing it); restoring it "
                   "unverified", step_dir, CHECKSUM_FILE)
  except DataError as e:
    error = str(e)
  if error := sharding.process_zero_verdict(error, "checksums differ (details in process 0's log)"):
    raise DataError(error)
  meta = dict(manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))["meta"])
  saved = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / "state").tree
  if differences := other_run_differences(meta, identity, _shapes(_state_tree(state)),
                                          _shapes(saved)):
    data_differs = any(meta.get(k) not in (None, v) for k, v in identity.items() if v is not None)
    what = "other data" if data_differs else "other data or with another model"
    raise OtherRunError(
        f"checkpoint {step} in {manager.directory} was trained on {what} "
        f"({first_of(differences, 3)}); nothing was moved: resume it with its own data, or use "
        "another --workdir")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
  tree = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))["state"]
  state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
  if not is_finite(state):
    raise DataError("the restored parameters or optimizer state hold NaN or infinite values")
  return state, meta


def restore(manager: ocp.CheckpointManager, state, step: int | None = None,
            workdir: str | None = None, identity: dict[str, Any] | None = None):
  """(state, meta) restored into the structure and shardings of `state`, or None if none is
  readable. `step`: that one (DataError if missing or damaged), or None: the resume order above,
  damaged steps moved into `workdir` (if given). OtherRunError if `identity` disagrees."""
  finalize(manager)  # a save of this run lands and is hashed before it is read
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None and step not in steps:
    raise DataError(f"no checkpoint for step {step} in {manager.directory} "
                    f"(available: {sorted(steps) or 'none'})")
  damaged, result = [], None
  for s in steps if step is None else [step]:
    try:
      result = _restore_step(manager, s, state, identity or {})
      break
    except OtherRunError:
      raise  # not moved aside: another run's checkpoints stay where they are
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
      if step is not None:
        raise DataError(f"checkpoint {step} in {manager.directory} is unreadable or damaged "
                        f"({describe(e)})") from None
      logging.warning("Checkpoint at step %d is damaged and is skipped (%s)", s, describe(e))
      damaged.append(s)
  if damaged and workdir is not None:  # out of the manager's way, so their steps can be saved
    target = os.path.join(workdir, "checkpoints_damaged")
    for s in damaged if jax.process_index() == 0 else []:
      source, dest = _step_dir(manager, s), os.path.join(target, f"{s}-{int(time.time())}")
      if os.path.exists(source):
        os.makedirs(target, exist_ok=True)
        shutil.move(source, dest)
        logging.warning("Moved damaged checkpoint %s to %s", source, dest)
    manager.reload()
  return result
