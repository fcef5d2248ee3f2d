"""The export (`mian_jax.export`) and its loader (`mian_jax.serving`): exported scores equal the
in-process ones for every model, the loader needs no model code, the directory appears whole."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from configs import tabular as tabular_config
from mian_jax import encoding, evaluate, export, models, serving, steps, train
from mian_jax import workdir as workdir_lib
from mian_jax.data import pipeline, tabular
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError
from tests import test_vocab
from tests.helpers import REPO, tiny_config

TOLERANCE = 1e-5
ALL_SIZES = (1, 37, 1000)  # one row, an odd batch, a batch larger than the split (rows repeat)
ALL_SIZES_FOR = ("mian", "din")  # the other models at batch 37 only, to keep the file fast


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, export dir, final metrics) of a model trained 4 steps and exported by the
  command. The model is LR, the fastest to compile: the parity test covers every model."""
  root = tmp_path_factory.mktemp("export")
  cache = str(tmp_path_factory.getbasetemp() / "cache")  # the one conftest's fixture sets
  workdir, out = str(root / "run"), str(root / "exported")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", cache)
    results = train.train_and_evaluate(
        tiny_config(**{"model.name": "lr", "train.num_train_steps": 4}), workdir)
  done = subprocess.run([sys.executable, "-m", "mian_jax.export", f"--workdir={workdir}",
                         f"--out={out}"], cwd=REPO, env=dict(os.environ, MIAN_JAX_CACHE=cache),
                        capture_output=True, text=True, timeout=300, umask=0o022)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"exported lr step 4 to {out} for cpu" in done.stdout
  return workdir, out, results


@pytest.fixture(scope="module")
def scorer(trained):
  return serving.Scorer.load(trained[1])


def _read(directory, name):
  with open(os.path.join(directory, name)) as f:
    return json.load(f)


def _random_state(model, tx, batch, rng, mesh, row_sharded_fields=frozenset()):
  """Stands in for `steps.create_train_state`: parameters of the shapes the model initialises
  (`jax.eval_shape`, so nothing is compiled), drawn from N(0, 0.5) so that scores spread out,
  replicated over `mesh`."""
  del rng, row_sharded_fields
  key = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(
      lambda: model.init({"params": key, "dropout": key}, batch, train=False)["params"])
  draw = np.random.default_rng(0)
  params = jax.tree.map(lambda x: draw.normal(0, 0.5, x.shape).astype(x.dtype), shapes)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return steps.TrainState(step=jax.device_put(np.int32(0), replicated), apply_fn=model.apply,
                          params=jax.device_put(params, replicated), tx=tx, opt_state=None)


def _max_differences(scorer, reference, columns, schema, num_rows):
  """{output: max |exported - in-process|} on `num_rows` rows of the valid split (every 7th,
  wrapping around)."""
  rows = (np.arange(num_rows) * 7 + 3) % schema.size("valid")
  got = scorer.score(pipeline.gather_batch(columns, schema, rows))
  assert all(v.shape[0] == num_rows for v in got.values())
  return {k: float(np.max(np.abs(v - reference[k][rows]))) for k, v in got.items()}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_exported_scores_equal_in_process_scores(name, tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "create_train_state", _random_state)
  run = steps.setup(tiny_config(**{"model.name": name}), verify_data=False)
  state = run.state
  reference = evaluate.predict_split(
      run, state, "valid", eval_step=steps.make_eval_step(run.mesh, with_attention=True))
  # Scores that differ from row to row, so that a mix-up would show.
  assert np.isfinite(reference["prob"]).all() and reference["prob"].std() > 0.05
  manifest = export.export_run(run, state, str(tmp_path / "out"))
  assert manifest["platforms"][0] == "cpu"
  scorer = serving.Scorer.load(str(tmp_path / "out"))
  expected = {"prob", *(k for k in reference if k.startswith("attention."))}
  assert set(scorer.output_names) == expected
  if name == "mian":  # what each attention module's weights are over
    names = evaluate.attention_names(run)
    assert {x["name"]: x.get("over") for x in scorer.signature["outputs"]} == {
        "prob": None, "attention.ibim": "hist", "attention.gim": list(names["gim"]),
        "attention.iuim": list(names["iuim"]), "attention.icim": list(names["icim"])}
  columns = schema_lib.load_split(run.data_dir, "valid", run.schema)
  for num_rows in ALL_SIZES if name in ALL_SIZES_FOR else (37,):
    differences = _max_differences(scorer, reference, columns, run.schema, num_rows)
    print(f"{name} batch {num_rows}: max abs difference {max(differences.values()):.2e}")
    assert set(differences) == expected
    assert max(differences.values()) < TOLERANCE, (num_rows, differences)


def test_the_command_exports_the_checkpoint_with_its_signature_and_manifest(trained):
  workdir, out, _ = trained
  run, state, meta = workdir_lib.restore_run(workdir)
  assert sorted(os.listdir(out)) == sorted(
      ["model.jaxexport", "params.npz", "signature.json", "manifest.json", "schema.json",
       *(["vocab"] if os.path.isdir(os.path.join(run.data_dir, "vocab")) else [])])
  manifest = _read(out, "manifest.json")
  assert manifest["model"] == "lr" and manifest["step"] == 4
  assert manifest["data_checksum"] == meta["data_checksum"] == run.data_checksum
  assert manifest["schema_fingerprint"] == run.schema.fingerprint()
  assert manifest["jax_version"] == jax.__version__
  assert set(manifest["platforms"]) | set(manifest["platforms_skipped"]) == {"cpu", "cuda"}
  signature = _read(out, "signature.json")
  assert [(x["name"], x["dtype"], tuple(x["shape"])) for x in signature["inputs"]] == [
      (name, dtype, shape) for name, (dtype, shape) in export.input_columns(run.schema).items()]
  assert signature["outputs"] == [{"name": "prob", "dtype": "float32", "shape": []}]
  # Its scores are those of the checkpoint in process.
  reference = evaluate.predict_split(
      run, state, "valid", eval_step=steps.make_eval_step(run.mesh, with_attention=True))
  columns = schema_lib.load_split(run.data_dir, "valid", run.schema)
  differences = _max_differences(serving.Scorer.load(out), reference, columns, run.schema, 37)
  assert max(differences.values()) < TOLERANCE, differences


_LOADER = """
import sys
for name in ("flax", "optax", "orbax", "ml_collections", "clu", "pandas", "pyarrow",
             "mian_jax.models", "mian_jax.data", "mian_jax.steps"):
  sys.modules[name] = None  # importing any of them now raises ImportError
import numpy as np
from mian_jax import serving
scorer = serving.Scorer.load(sys.argv[1])
with np.load(sys.argv[2]) as batch:
  out = scorer.score(dict(batch))
heavy = sorted(m for m, module in sys.modules.items() if module is not None and (
    m.split(".")[0] in ("flax", "ml_collections", "optax", "orbax")
    or m.startswith("mian_jax.") and m not in ("mian_jax.serving", "mian_jax.encoding",
                                               "mian_jax.errors", "mian_jax.fileio")))
print(heavy)
print(" ".join(repr(float(p)) for p in out["prob"]))
"""


def test_the_loader_imports_no_flax_and_no_model_code(trained, scorer, tmp_path):
  rng = np.random.default_rng(0)
  batch = {}
  for x in scorer.signature["inputs"]:
    low, high = x["range"]
    batch[x["name"]] = rng.integers(low, high, (3, *x["shape"])).astype(np.int32)
  batch["hist_len"] = np.array([0, 2, 6], np.int32)
  np.savez(tmp_path / "batch.npz", **batch)
  done = subprocess.run([sys.executable, "-c", _LOADER, trained[1], str(tmp_path / "batch.npz")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  heavy, probs = done.stdout.strip().splitlines()[-2:]
  assert heavy == "[]"
  np.testing.assert_allclose([float(p) for p in probs.split()], scorer.score(batch)["prob"],
                             atol=TOLERANCE)


def _valid_batch(scorer, num_rows=5):
  rng = np.random.default_rng(1)
  return {x["name"]: rng.integers(x["range"][0], x["range"][1],
                                  (num_rows, *x["shape"])).astype(np.int32)
          for x in scorer.signature["inputs"]}


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("item.item_id"), "input 'item.item_id' is missing"),
    (lambda b: b.update(ite_id=b["hist_len"]), "unknown input 'ite_id'"),
    (lambda b: b.update({"user.gender": b["user.gender"].astype(str)}),
     "input 'user.gender' holds <U"),
    (lambda b: b.update({"hist.item_id": b["hist.item_id"][:, :4]}),
     r"input 'hist.item_id' has shape \[5, 4\]; expected \[batch, 6\]"),
    (lambda b: b.update({"context.hour": b["context.hour"][:4]}),
     "input 'context.hour' has 4 rows but 'item.item_id' has 5"),
    (lambda b: b.update({"item.item_id": b["item.item_id"] + 1000}),
     r"input 'item.item_id' holds values in \[\d+, \d+\]; expected \[1, 41\]"),
    (lambda b: b.update(hist_len=np.full(5, 7)), r"input 'hist_len' .*expected \[0, 6\]"),
])
def test_bad_input_gives_a_one_line_error_naming_the_field(scorer, change, message):
  batch = _valid_batch(scorer)
  scorer.score(batch)  # the unchanged batch is fine, and so are int64 ids and extra keys:
  scorer.score({**{k: v.astype(np.int64) for k, v in batch.items()},
                "label": np.zeros(5, np.float32), "weight": np.ones(5, np.float32)})
  change(batch)
  with pytest.raises(ValueError, match=message) as error:
    scorer.score(batch)
  assert "\n" not in str(error.value)


def test_an_empty_batch_scores_to_empty_outputs(scorer):
  out = scorer.score(_valid_batch(scorer, num_rows=0))
  assert list(out) == ["prob"] and out["prob"].shape == (0,) and out["prob"].dtype == np.float32


def test_the_export_directory_appears_whole_or_not_at_all(trained, tmp_path, monkeypatch):
  workdir, out, _ = trained
  with open(os.path.join(out, "model.jaxexport"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(out, "params.npz")) as arrays:
    params = dict(arrays)
  data_dir = out  # like a prepared directory, it holds a schema.json (and vocab/)
  write = lambda target: export.write_export(  # noqa: E731
      target, exported, params, _read(out, "signature.json"), _read(out, "manifest.json"),
      data_dir)
  target = str(tmp_path / "exports" / "a")
  real_savez = np.savez

  def fail_midway(*args, **kwargs):
    real_savez(*args, **kwargs)
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(np, "savez", fail_midway)
  with pytest.raises(DataError, match="cannot write the export .*No space left on device"):
    write(target)
  assert os.listdir(tmp_path / "exports") == []  # neither the target nor a temporary sibling
  monkeypatch.setattr(np, "savez", real_savez)
  os.makedirs(target)  # an empty directory is replaced
  write(target)
  assert serving.Scorer.load(target).manifest == serving.Scorer.load(out).manifest
  with pytest.raises(ConfigError, match="exists and is not an empty directory"):
    write(target)
  with pytest.raises(ConfigError, match="exists and is not an empty directory"):
    export.export_checkpoint(workdir, target)
  with open(os.path.join(target, "params.npz"), "ab") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match="params.npz differs from the checksum"):
    serving.Scorer.load(target)


def test_a_missing_workdir_or_checkpoint_is_a_one_line_error(trained, tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    export.export_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"))
  empty = tmp_path / "untrained"
  empty.mkdir()
  with pytest.raises(DataError, match="has no config.json"):
    export.export_checkpoint(str(empty), str(tmp_path / "out"))
  (empty / "config.json").write_text(open(os.path.join(trained[0], "config.json")).read())
  with pytest.raises(DataError, match="no checkpoints in"):
    export.export_checkpoint(str(empty), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_a_platform_that_cannot_be_lowered_for_is_left_out_and_recorded(tmp_path, monkeypatch):
  monkeypatch.setattr(steps, "create_train_state", _random_state)
  run = steps.setup(tiny_config(**{"model.name": "lr"}), verify_data=False)
  real_export = jax.export.export

  def no_cuda(fun, *, platforms):
    if "cuda" in platforms:
      raise NotImplementedError("MLIR translation rule for primitive 'x' not found for cuda")
    return real_export(fun, platforms=platforms)

  monkeypatch.setattr(jax.export, "export", no_cuda)
  manifest = export.export_run(run, run.state, str(tmp_path / "out"), ("cpu", "cuda"))
  assert manifest["platforms"] == ["cpu"]
  assert list(manifest["platforms_skipped"]) == ["cuda"]
  assert "not found for cuda" in manifest["platforms_skipped"]["cuda"]
  assert serving.Scorer.load(str(tmp_path / "out")).manifest["platforms"] == ["cpu"]
  with pytest.raises(ConfigError, match="cannot export for any of --platforms=cuda"):
    export.export_run(run, run.state, str(tmp_path / "other"), ("cuda",))
  assert export.parse_platforms("cpu, cuda,cpu") == ("cpu", "cuda")
  with pytest.raises(ConfigError, match="expected a comma-separated subset of cpu,cuda"):
    export.parse_platforms("cpu,gpu")


# ------------------------------------------------------------------- encode: hashed fields

_HASH_CSV = test_vocab.CSV  # the hand-worked tabular log of tests/test_vocab.py


def test_encode_of_hashed_fields_equals_the_prepared_columns(tmp_path):
  """Scorer.encode with the vocab/ of a tabular directory whose item_id, category and city are
  hashed: the raw test rows encode to the prepared test split (the model is not needed)."""
  (tmp_path / "log.csv").write_text(_HASH_CSV)
  config = tabular_config.get_config().data
  config.max_seq_len = 2
  t = config.tabular
  t.path, t.valid_fraction, t.test_fraction = str(tmp_path / "log.csv"), 0.2, 0.2
  t.item_fields = "item_id:hash(1000),category:hash(50),price:numeric"
  t.user_fields = "age_group,gender,city:hash(20)"
  directory = str(tmp_path / "prepared")
  tabular.prepare(config, directory)
  schema = schema_lib.read_schema(directory)
  test = schema_lib.load_split(directory, "test", schema)
  signature = {"inputs": [{"name": name, "dtype": dtype, "shape": list(shape)}
                          for name, (dtype, shape) in export.input_columns(schema).items()],
               "ignored_inputs": list(export.NOT_INPUTS), "outputs": []}
  scorer = serving.Scorer(directory, types.SimpleNamespace(call=lambda *args: {}), {},
                          signature, {})  # a prepared directory holds vocab/ as an export does
  # Test rows b@40 (i4, first seen here) and a@50 (i1, no city); earlier clicks oldest first.
  records = {"item.item_id": ["i4", "i1"], "item.category": ["c3", "c1"],
             "item.price": [7.0, 1.0], "user.age_group": ["30", "20"],
             "user.gender": ["M", "F"], "user.city": ["y", None],
             "context.hour": ["13", "14"], "context.device": ["web", "ios"],
             "hist.item_id": [["i2"], ["i1", "i3"]], "hist.category": [["c2"], ["c1", "c1"]]}
  batch, unseen = scorer.encode(records)
  assert set(batch) == set(scorer.input_names)
  for name in scorer.input_names:
    np.testing.assert_allclose(batch[name], test[name], rtol=1e-6, err_msg=name)
  assert batch["item.item_id"][0] != encoding.OOV_ID
  assert batch["user.city"][1] == encoding.OOV_ID
  # Hashed fields: only a missing value counts (a@50's city); hours 13, 14 are not in the
  # training vocabulary of hour (9, 10, 11).
  assert unseen == {"item.item_id": 0, "item.category": 0, "user.age_group": 0,
                    "user.gender": 0, "user.city": 1, "context.hour": 2, "context.device": 0,
                    "hist.item_id": 0, "hist.category": 0}


# ------------------------------------------------ the manifest covers every file; modes

def test_the_manifest_covers_every_file_and_the_directory_is_readable_by_all(trained,
                                                                            tmp_path):
  """The command's export (run under umask 022): 0755 directories, 0644 files; every file but
  the manifest has its SHA-256 there, so an edit to signature.json, schema.json or vocab/, a
  deleted file or an added one is a one-line error naming the file."""
  _, out, _ = trained
  for root, _, files in os.walk(out):
    assert os.stat(root).st_mode & 0o777 == 0o755, root
    for name in files:
      assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o644, name
  listed = _read(out, "manifest.json")["sha256"]
  assert listed == serving.checksums(out) and "signature.json" in listed
  assert "manifest.json" not in listed
  for change, message in [
      (lambda d: (d / "schema.json").write_text((d / "schema.json").read_text() + " "),
       "schema.json differs from the checksum in manifest.json"),
      (lambda d: (d / "signature.json").unlink(), "signature.json is missing"),
      (lambda d: (d / "vocab").mkdir(exist_ok=True) or
       (d / "vocab" / "lookup.item.x.json").write_text("{}"),
       "lookup.item.x.json is not covered by the checksums in manifest.json")]:
    copy = tmp_path / f"copy{len(os.listdir(tmp_path))}"
    subprocess.run(["cp", "-r", out, str(copy)], check=True)
    serving.Scorer.load(str(copy))
    change(copy)
    with pytest.raises(ValueError, match=message) as error:
      serving.Scorer.load(str(copy))
    assert "\n" not in str(error.value) and str(copy) in str(error.value)
