"""Exports a checkpoint as a scoring function that runs without the model code (`jax.export`),
which `serving.Scorer` loads with only jax and numpy (docs/serving.md, "The export directory").

  python -m mian_jax.export --workdir=runs/synthetic --out=exports/synthetic \\
      [--step=best|latest|N] [--platforms=cpu,cuda]
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jaxlib
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from mian_jax import cli, evaluate, fileio, serving, steps
from mian_jax import workdir as workdir_lib
from mian_jax.data import pipeline
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError, describe

SCHEMA_FILE = "schema.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what `jax.export` can lower for
# Columns of a prepared split (and keys of a pipeline batch) that no model reads when scoring.
NOT_INPUTS = ("label", "weight", "group_id")
_PARAM_SEP = "/"


def input_columns(schema: schema_lib.Schema) -> dict[str, tuple[str, tuple[int, ...]]]:
  """The columns a model reads when scoring: name -> (dtype, per-example shape)."""
  return {name: spec for name, spec in schema.columns().items()
          if name not in NOT_INPUTS and not name.startswith("extra.")}


def export_scorer(state, schema: schema_lib.Schema, platforms: Sequence[str]):
  """(score(params, inputs): `steps.eval_step` with attention on flat parameters {"a/b/c": array}
  and flat inputs, lowered with a symbolic batch size for `platforms`; {platform this jaxlib
  cannot lower for, left out with a warning: why}); ConfigError if none can be."""
  template = state.replace(params=None, opt_state=None)

  @jax.jit
  def score(params, inputs):
    params = traverse_util.unflatten_dict(params, sep=_PARAM_SEP)
    out = steps.eval_step(template.replace(params=params), pipeline.nest(inputs),
                          with_attention=True)
    return {"prob": out["prob"], **{f"attention.{k}": v for k, v in out["attention"].items()}}

  batch_size, = jax.export.symbolic_shape("b")
  inputs = {name: jax.ShapeDtypeStruct((batch_size, *shape), np.dtype(dtype))
            for name, (dtype, shape) in input_columns(schema).items()}
  params = {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in
            traverse_util.flatten_dict(state.params, sep=_PARAM_SEP).items()}

  def lower(for_platforms):
    return jax.export.export(score, platforms=tuple(for_platforms))(params, inputs)

  try:
    return lower(platforms), {}
  except Exception as e:  # noqa: BLE001 - a lowering rule missing for some platform
    error = describe(e)
  skipped = {}
  for platform in platforms:
    try:
      lower([platform])
    except Exception as e:  # noqa: BLE001
      skipped[platform] = describe(e)
      logging.warning("Not exporting for %s, which this jaxlib cannot lower for: %s", platform,
                      skipped[platform])
  if len(skipped) == len(platforms):
    raise ConfigError(f"cannot export for any of --platforms={','.join(platforms)} ({error})")
  return lower([p for p in platforms if p not in skipped]), skipped


def signature(exported, schema: schema_lib.Schema,
              attention_names: Mapping[str, Sequence[str]]) -> dict[str, Any]:
  """What signature.json says: the inputs, with the ids each may hold, and the outputs."""
  f = schema.features  # ids 0 (padding) and 1 (out of vocabulary) are reserved
  ranges = {name: [schema_lib.OOV_ID, x.vocab_size]
            for name, x in f.fields().items() if x.is_categorical}
  ranges.update({f"hist.{name}": [schema_lib.PAD_ID, f.item_field(name).vocab_size]
                 for name in f.behavior_fields}, hist_len=[0, f.max_seq_len + 1])
  inputs = [{"name": name, "dtype": dtype, "shape": list(shape),
             **({"range": ranges[name]} if name in ranges else {})}
            for name, (dtype, shape) in input_columns(schema).items()]
  avals = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
  outputs = [{"name": name, "dtype": str(avals[name].dtype),
              "shape": [int(d) for d in avals[name].shape[1:]]}
             for name in sorted(avals, key=lambda n: (n != "prob", n))]
  for entry in outputs[1:]:  # "attention.<module>", over "hist" unless `attention_names` says
    module = entry["name"].removeprefix("attention.")
    entry["over"] = list(attention_names[module]) if module in attention_names else "hist"
  return {"format_version": serving.FORMAT_VERSION, "batch_dimension": "b", "inputs": inputs,
          "ignored_inputs": [*NOT_INPUTS, *(f"extra.{n}" for n in schema.extra_columns)],
          "outputs": outputs}


def _readable_by_all(directory: str) -> None:
  """Gives `directory` (a 0700 mkdtemp) and its files the umask's modes (e.g. 0755 / 0644)."""
  umask = os.umask(0)
  os.umask(umask)
  for root, _, files in os.walk(directory):
    os.chmod(root, 0o777 & ~umask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~umask)


def check_out_dir(out: str) -> None:
  """ConfigError unless `out` is absent or an empty directory."""
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise ConfigError(f"--out={out} exists and is not an empty directory; remove it or choose "
                      "another --out")


def write_export(out: str, exported, params: Mapping[str, np.ndarray],
                 signature_content: Mapping[str, Any], manifest: Mapping[str, Any],
                 data_dir: str) -> None:
  """Writes the export directory into a temporary sibling of `out`, then renames it."""
  check_out_dir(out)
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  schema_lib.remove_stale_tmp(out)  # left by an export that died
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=parent)
  try:
    with open(os.path.join(tmp, serving.EXPORT_FILE), "wb") as f:
      f.write(exported.serialize())
    np.savez(os.path.join(tmp, serving.PARAMS_FILE), **params)
    fileio.write_text_atomic(os.path.join(tmp, serving.SIGNATURE_FILE),
                             json.dumps(signature_content, indent=2) + "\n")
    shutil.copyfile(os.path.join(data_dir, SCHEMA_FILE), os.path.join(tmp, SCHEMA_FILE))
    vocab_dir = os.path.join(data_dir, schema_lib.VOCAB_DIR)
    if os.path.isdir(vocab_dir):
      shutil.copytree(vocab_dir, os.path.join(tmp, serving.VOCAB_DIR))
    fileio.write_text_atomic(os.path.join(tmp, serving.MANIFEST_FILE), json.dumps(
        {**manifest, "sha256": serving.checksums(tmp)}, indent=2) + "\n")
    _readable_by_all(tmp)
    os.rename(tmp, out)  # replaces an empty `out`; fails if something was written there since
  except OSError as e:
    raise DataError(f"cannot write the export to {out} ({e.strerror or e})") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename


def parse_platforms(text: str) -> tuple[str, ...]:
  platforms = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
  if not platforms or not set(platforms) <= set(PLATFORMS):
    raise ConfigError(f"--platforms={text!r}: expected a comma-separated subset of "
                      f"{','.join(PLATFORMS)}")
  return platforms


def export_run(run: steps.Run, state, out: str, platforms: Sequence[str] = ("cpu", "cuda"),
               meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Exports `state` of `run` to `out`; returns the manifest."""
  check_out_dir(out)  # before the lowering, which takes a while
  meta = dict(meta or {})
  exported, skipped = export_scorer(state, run.schema, platforms)
  manifest = {"format_version": serving.FORMAT_VERSION, "model": run.config.model.name,
              "step": int(jax.device_get(state.step)),
              "data_checksum": meta.get("data_checksum", run.data_checksum),
              "schema_fingerprint": run.schema.fingerprint(),
              "platforms": list(exported.platforms), "platforms_skipped": skipped,
              "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
  if meta.get("best_step") == manifest["step"] and meta.get("best_valid_auc") is not None:
    manifest["valid_auc"] = meta["best_valid_auc"]  # known for a step that was the best
  write_export(out, exported,
               traverse_util.flatten_dict(jax.device_get(state.params), sep=_PARAM_SEP),
               signature(exported, run.schema, evaluate.attention_names(run)), manifest,
               run.data_dir)
  return manifest


def export_checkpoint(workdir: str, out: str, step: int | str = "latest",
                      platforms: Sequence[str] = ("cpu", "cuda")) -> dict[str, Any]:
  """Restores a checkpoint of `workdir` and exports it to `out`; returns the manifest."""
  cli.check_one_process("the export")
  check_out_dir(out)
  run, state, meta = workdir_lib.restore_run(workdir, step)
  manifest = export_run(run, state, out, platforms, meta)
  logging.info("Exported step %d of %s to %s for %s", manifest["step"], workdir, out,
               ",".join(manifest["platforms"]))
  return manifest


def _define_flags() -> None:
  cli.define_checkpoint_flags("export")
  flags.DEFINE_string("out", None, "Export directory to create (absent or empty).")
  flags.DEFINE_string("platforms", "cpu,cuda", "Platforms to lower for (of "
                      f"{','.join(PLATFORMS)}); one this jaxlib cannot lower for is skipped.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  cli.init_process(argv)
  flag = flags.FLAGS
  manifest = cli.run_or_exit(lambda: export_checkpoint(
      flag.workdir, flag.out, workdir_lib.parse_step(flag.step), parse_platforms(flag.platforms)))
  skipped = "".join(f" (skipped {p})" for p in manifest["platforms_skipped"])
  print(f"exported {manifest['model']} step {manifest['step']} to {flag.out} for "
        f"{','.join(manifest['platforms'])}{skipped}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
