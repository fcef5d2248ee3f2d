"""The benchmark scripts' data builders, flags and peer requests (no timing here: speed targets
live in the scripts). Nothing here imports torch; the one test that runs the DeepCTR-Torch peer
uses its own venv and is skipped without it."""

import json
import os
import subprocess

import numpy as np
import pytest

from benchmarks import (ab_step, accelerator, common, compare_deepctr, profile_step, roofline,
                        serving, throughput)
from tests.helpers import REPO, markdown_rows, tiny_config

pytestmark = pytest.mark.slow  # real runs, several processes or devices: `pytest -m slow`

PEER_PYTHON = os.path.join(REPO, ".venv-torch", "bin", "python")


def test_throughput_data_has_amazon_vocabularies_and_valid_columns():
  schema, columns = common.make_data("electronics")  # validates the columns itself
  f = schema.features
  assert f.item_field("item_id").vocab_size == 63_001 + 2
  assert f.item_field("category").vocab_size == 801 + 2
  assert columns["hist.item_id"].shape == (common.NUM_EXAMPLES, 30)
  assert columns["user.user_id"].max() < 192_403 + 2
  assert np.isin(columns["label"], (0, 1)).all()


def test_throughput_measures_each_pair_repeats_times_and_appends_the_medians(tmp_path,
                                                                              monkeypatch):
  """Without --peer, main measures every (model, batch size) --repeats times, each in a child
  with the --vocab, --seconds and --optimizer given, and appends one median row per pair."""
  calls = []

  def fake_run_ours(model, batch, args, data_dir=""):
    calls.append((model, batch, args.vocab, args.seconds, args.optimizer, data_dir))
    rate = 100.0 * len(calls)
    return {"impl": "mian_jax", "model": model, "batch_size": batch,
            "train_samples_per_s": rate, "eval_samples_per_s": 2 * rate, "compile_s": 1.0,
            "peak_rss_mb": 10.0}

  monkeypatch.setattr(throughput, "run_ours", fake_run_ours)
  out = tmp_path / "out.jsonl"
  out.write_text('{"earlier": "row"}\n')
  throughput.main(["--models=lr,din", "--batch_sizes=8,16", "--vocab=tiny", "--seconds=0.5",
                   "--optimizer=lazy_adam", "--repeats=3", f"--out={out}"])
  pairs = [("lr", 8), ("lr", 16), ("din", 8), ("din", 16)]
  assert calls == [(m, b, "tiny", 0.5, "lazy_adam", "") for m, b in pairs for _ in range(3)]
  earlier, *rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert earlier == {"earlier": "row"}  # appended, not overwritten
  assert [(r["model"], r["batch_size"], r["repeats"]) for r in rows] == [
      (m, b, 3) for m, b in pairs]
  for i, row in enumerate(rows):  # the i-th pair's runs were calls 3i+1..3i+3
    runs = [100.0 * (3 * i + k) for k in (1, 2, 3)]
    assert row["train_samples_per_s_runs"] == runs and row["train_samples_per_s"] == runs[1]


def test_throughput_rejects_unknown_optimizer_and_zero_repeats():
  for argv in (["--optimizer=sgd"], ["--repeats=0"]):
    with pytest.raises(SystemExit):
      throughput.parse_args(argv)


def test_throughput_child_parses_the_flags_its_parent_was_given(monkeypatch):
  """run_ours's `--single` child command, parsed as the child parses it, carries the parent's
  --vocab, --seconds, --optimizer and --max_steps_in_flight, and the pair and data dir."""
  parent = throughput.parse_args(["--vocab=tiny", "--seconds=0.5", "--optimizer=lazy_adam",
                                  "--max_steps_in_flight=3"])
  children = []

  def fake_run(command, **kwargs):
    children.append(throughput.parse_args(command[3:]))
    return subprocess.CompletedProcess(command, 0, stdout='{"rate": 1}\n', stderr="")

  monkeypatch.setattr(throughput.subprocess, "run", fake_run)
  assert throughput.run_ours("din", 64, parent, "/data") == {"rate": 1}
  (child,) = children
  assert (child.single, child.data_dir, child.vocab, child.seconds, child.optimizer,
          child.max_steps_in_flight) == ("din,64", "/data", "tiny", 0.5, "lazy_adam", 3)


def test_peer_request_carries_our_hyperparameters_and_the_schema_columns():
  schema, columns = common.make_data("tiny", num_examples=256)
  config = common.make_config("din", 64)
  req = throughput.peer_request(config, schema, columns, "/data", seconds=7.0, threads=2)
  assert (req["mode"], req["model"], req["data_dir"], req["threads"]) == (
      "throughput", "din", "/data", 2)
  assert (req["seconds"], req["eval_seconds"]) == (7.0, 5.0)
  m, t, h = config.model, config.train, req["hparams"]
  assert h["embed_dim"] == m.embed_dim and h["mlp_dims"] == list(m.mlp_dims)
  assert h["attention_mlp_dims"] == list(m.attention_mlp_dims)
  assert (h["dropout_rate"], h["init_std"], h["use_dice"]) == (
      m.dropout_rate, m.init_std, m.use_dice)
  assert (h["batch_size"], h["learning_rate"]) == (64, t.learning_rate)
  assert (h["adam_b1"], h["adam_b2"], h["adam_eps"]) == (t.adam_b1, t.adam_b2, t.adam_eps)
  cd = compare_deepctr
  l2 = cd.peer_l2("matched", t.l2_weight, t.l2_scope, 64,
                  cd.lookups_per_example(schema, columns["hist_len"]), cd.table_rows(schema))
  assert l2["l2_reg_embedding"] > 0
  assert {k: h[k] for k in l2} == l2
  assert req["spec"] == cd.feature_column_spec(schema, m.sequence_pooling)
  assert {c["column"] for c in req["spec"]["columns"]} == {
      name for name in schema.columns() if name.split(".")[0] in ("item", "hist", "user",
                                                                   "context")}
  json.dumps(req)  # JSON-able


def test_shared_data_round_trips(tmp_path):
  schema, columns = common.make_data("tiny", num_examples=256)
  throughput.write_shared_data(str(tmp_path / "data"), schema, columns)
  read_schema, read_columns = throughput.load_shared_data(str(tmp_path / "data"))
  assert read_schema.features == schema.features and read_schema.size("train") == 256
  for name, a in columns.items():
    np.testing.assert_array_equal(read_columns[name], a)


def test_median_rows_and_ratios():
  runs = [{"impl": "mian_jax", "model": "din", "batch_size": 8, "train_samples_per_s": x,
           "eval_samples_per_s": 2 * x, "compile_s": 1.0, "peak_rss_mb": 10.0}
          for x in (30.0, 10.0, 20.0)]
  ours = throughput.median_row(runs)
  assert ours["train_samples_per_s"] == 20.0 and ours["train_samples_per_s_runs"] == [30, 10, 20]
  assert ours["repeats"] == 3
  theirs = throughput.median_row([{**runs[0], "impl": "deepctr_torch",
                                   "train_samples_per_s": 5.0, "eval_samples_per_s": 8.0}])
  assert "train_samples_per_s_runs" not in theirs
  throughput.add_ratios(ours, theirs)
  assert (ours["ratio_train_vs_peer"], ours["ratio_eval_vs_peer"]) == (4.0, 5.0)
  summary = throughput.format_summary([ours, theirs])
  assert "4.00x" in summary and "5.00x" in summary


def test_missing_peer_python_exits_with_instructions(tmp_path):
  with pytest.raises(SystemExit, match="pip install torch"):
    throughput.main(["--peer", f"--peer_python={tmp_path / 'nope'}", "--models=din",
                     f"--out={tmp_path / 'out.jsonl'}"])
  assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(not os.access(PEER_PYTHON, os.X_OK),
                    reason=f"no DeepCTR-Torch venv at {PEER_PYTHON} (see compare_deepctr.py)")
def test_peer_throughput_mode_returns_a_row(tmp_path):
  schema, columns = common.make_data("tiny", num_examples=256)
  data_dir = str(tmp_path / "data")
  throughput.write_shared_data(data_dir, schema, columns)
  req = throughput.peer_request(common.make_config("din", 16), schema, columns, data_dir,
                                seconds=1.0, threads=1)
  row = common.run_peer(req, PEER_PYTHON, timeout=300)
  assert {"impl", "model", "batch_size", "train_samples_per_s", "eval_samples_per_s",
          "compile_s", "peak_rss_mb", "torch_threads", "flush_denormal", "torch_version",
          "deepctr_torch_version"} <= set(row)
  assert (row["impl"], row["model"], row["batch_size"]) == ("deepctr_torch", "din", 16)
  assert row["torch_threads"] == 1
  assert row["train_samples_per_s"] > 0 and row["eval_samples_per_s"] > 0


def test_accelerator_script_sweeps_meshes_and_derives_the_books_epoch(tmp_path, capsys):
  """Data-parallel (2x1) and with the tiny vocabulary's item_id and user_id tables (502 and 302
  rows) row-sharded over two devices (1x2): a device then holds half of those tables."""
  out = tmp_path / "acc.jsonl"
  accelerator.main(["--batch_sizes=16", "--optimizers=lazy_adam", "--vocab=tiny",
                    "--seconds=0.2", "--meshes=2x1,1x2", "--row_shard_min_rows=300",
                    f"--out={out}"])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["mesh"] for r in rows] == [{"data": 2, "model": 1}, {"data": 1, "model": 2}]
  for row in rows:
    assert (row["model"], row["batch_size"], row["optimizer"]) == ("mian", 16, "lazy_adam")
    assert row["books_epoch_s"] == pytest.approx(
        accelerator.BOOKS_EPOCH_SAMPLES / row["train_samples_per_s"])
  # Parameters and Adam's two moments (3 x 16 floats a row): 502 + 302 rows replicated against
  # half of 512 + 320 (padded to row_multiple 64) rows.
  saved = (502 + 302 - (512 + 320) / 2) * 3 * 16 * 4 / 2**20
  assert rows[0]["state_mb_per_device"] - rows[1]["state_mb_per_device"] == pytest.approx(saved)
  assert "Books epoch" in capsys.readouterr().out
  with pytest.raises(ValueError, match="uses 4 devices, but there are 2"):
    accelerator.parse_meshes("2x2", 2)
  with pytest.raises(ValueError, match="is not <data>x<model>"):
    accelerator.parse_meshes("2by1", 2)


def test_roofline_counts_flops_and_the_dense_adam_bytes():
  row = roofline.model_costs("din", "tiny", 16)
  items, categories, users = common.VOCABS["tiny"]
  rows = items + categories + users + 8 + 12 + 7 + 6 + 7 * 2  # every table, reserved ids too
  assert row["table_mb"] == pytest.approx(rows * 16 * 4 / 1e6)
  assert row["dense_adam_mb_per_step"] == pytest.approx(roofline.ADAM_PASSES * row["table_mb"])
  assert 0 < row["eval_mflop_per_sample"] < row["train_mflop_per_sample"]


def test_profile_step_groups_op_time_by_module(tmp_path, capsys):
  hlo = ('  %fusion.3 = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, '
         'metadata={op_name="jit(train_step)/jvp(MIAN)/MIAN._ibim/transformer/attention/mul"}\n'
         '  ROOT %dot.1 = f32[8]{0} dot(%a, %b), metadata={op_name="jit(train_step)/mlp/dot"}')
  sources = profile_step.op_sources(hlo)
  assert sources == {"fusion.3": "jit(train_step)/jvp(MIAN)/MIAN._ibim/transformer/attention/mul",
                     "dot.1": "jit(train_step)/mlp/dot"}
  assert profile_step.group_name(sources["fusion.3"], 2) == "jvp(MIAN)/MIAN._ibim"
  profile_step.main(["--model=lr", "--batch_size=16", "--vocab=tiny", "--steps=2",
                     f"--trace_dir={tmp_path}"])
  assert "ms per step wall" in capsys.readouterr().out


def test_ab_step_parses_variants_and_rejects_bad_ones():
  assert ab_step.parse_variant("base") == ("base", [])
  assert ab_step.parse_variant("x: --config.model.dropout_rate=0.0 "
                               "--config.model.dropout_rng=threefry") == (
      "x", ["--config.model.dropout_rate=0.0", "--config.model.dropout_rng=threefry"])
  assert ab_step.parse_variant("two words: --config.model.mlp_dims='(16, 4)'") == (
      "two words", ["--config.model.mlp_dims=(16, 4)"])
  config = ab_step.variant_config("din", 64, "adam", ["--config.model.mlp_dims=(16,4)",
                                                      "--config.train.learning_rate=1"])
  assert config.model.mlp_dims == (16, 4) and config.train.learning_rate == 1.0
  assert (config.model.name, config.train.batch_size) == ("din", 64)
  for bad, message in [(["--config.model.dropout_rnq=hash"], "unknown config key"),
                       (["--config.model.num_heads=8x"], "invalid literal"),
                       (["--config.model.dropout_rng=philox"], "is not one of"),
                       (["model.dropout_rate=0.0"], "is not a config override")]:
    with pytest.raises(ValueError, match=message):
      ab_step.variant_config("mian", 64, "adam", bad)
  with pytest.raises(ValueError, match="expected 'name'"):
    ab_step.parse_variant(": --config.model.dropout_rate=0.0")
  with pytest.raises(SystemExit, match="variant 'b': unknown config key"):
    ab_step.main(["--model=lr", "--vocab=tiny", "--variant=a", "--variant=b: --config.train.lr=1"])


def test_ab_step_times_each_variant_in_alternating_rounds(tmp_path, capsys):
  out = tmp_path / "ab.jsonl"
  ab_step.main(["--model=deepfm", "--batch_size=16", "--vocab=tiny", "--rounds=2", "--steps=2",
                "--variant=hash", "--variant=threefry: --config.model.dropout_rng=threefry",
                f"--out={out}"])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["variant"] for r in rows] == ["hash", "threefry"]
  assert all(len(r["rounds"]) == 2 and r["min"] <= r["train_samples_per_s"] <= r["max"]
             for r in rows)
  assert rows[0]["ratio_to_first"] == 1.0
  assert rows[1]["overrides"] == ["--config.model.dropout_rng=threefry"]
  assert "threefry" in capsys.readouterr().out


def test_serving_benchmark_measures_scorer_and_eval_step_on_the_same_rows():
  """One model of the tiny config for about 1 s: a row per (implementation, batch size) with
  the measurements, versions, device and load average, scores that agree, and DeepCTR-Torch's
  predict written as not measured. No timing is asserted."""
  rows = serving.measure_model(tiny_config(), "din", seconds=1.0, batch_sizes=(1, 64), rounds=2)
  measured = [r for r in rows if r["measured"]]
  assert [(r["impl"], r["batch_size"]) for r in measured] == [
      (impl, b) for b in (1, 64) for impl in serving.IMPLS]
  for r in measured:
    assert (r["model"], r["trained"], r["step"], r["rows_from"]) == ("din", False, 0, "valid")
    assert r["calls"] >= 1 and r["rows_per_s"] > 0 and r["first_call_s"] > 0
    assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"]
    assert len(r["loadavg_start"]) == len(r["loadavg_end"]) == 3
    assert r["export_platforms"] == ["cpu"] and r["backend"] == "cpu"
    assert {"device", "cpu", "cpu_count", "jax_version", "jaxlib_version", "numpy_version",
            "python_version", "data_checksum", "num_parameters"} <= set(r)
    assert r["distinct_batches"] == (64 if r["batch_size"] == 1 else 4)  # 256 valid rows
  for r in measured[::2]:
    assert r["impl"] == "exported_scorer" and r["max_abs_diff_vs_eval_step"] < 1e-5
  (peer,) = [r for r in rows if not r["measured"]]
  assert (peer["impl"], peer["model"]) == ("deepctr_torch", "din")
  assert "--peer" in peer["reason"]
  table = markdown_rows(serving.format_table(rows))
  assert [line[:3] for line in table[:2]] == [
      ["din", serving.IMPL_NAMES["exported_scorer"], "1"],
      ["din", serving.IMPL_NAMES["eval_step"], "1"]]
  assert table[-1][3] == "not measured"
  json.dumps(rows)  # JSON-able, as append_jsonl writes them


_PEER_PYTHON = os.path.join(REPO, common.DEFAULT_PEER_PYTHON)


@pytest.mark.skipif(not os.access(_PEER_PYTHON, os.X_OK),
                    reason=f"no DeepCTR-Torch venv at {_PEER_PYTHON} (compare_deepctr.py says how "
                           "to create one)")
def test_serving_benchmark_measures_deepctr_torch_predict_with_the_peer():
  rows = serving.measure_model(tiny_config(), "din", seconds=0.5, batch_sizes=(1, 8), rounds=2,
                               peer=(_PEER_PYTHON, 1))
  peer = [r for r in rows if r["impl"].startswith("deepctr_torch")]
  assert [(r["impl"], r["batch_size"]) for r in peer] == [
      (impl, b) for b in (1, 8) for impl in serving.PEER_IMPLS]
  for r in peer:
    assert r["measured"] and r["calls"] >= 1 and 0 < r["latency_p50_ms"] <= r["latency_p99_ms"]
    assert {"torch_version", "deepctr_torch_version", "torch_threads"} <= set(r)
  assert len(markdown_rows(serving.format_table(rows))) == len(rows)


def test_scale_summary_reads_rates_validation_times_and_the_curve():
  from benchmarks import scale  # noqa: PLC0415
  records = [
      {"step": 100, "time": 10.0, "train/loss": 0.69, "train/samples_per_second": 50.0},
      {"step": 200, "time": 12.0, "train/loss": 0.60, "train/samples_per_second": 1000.0},
      {"step": 200, "time": 15.0, "valid_subsample/auc": 0.70},
      {"step": 300, "time": 17.0, "train/loss": 0.55, "train/samples_per_second": 3000.0},
      {"step": 300, "time": 18.0, "valid_subsample/auc": 0.75},
      {"step": 300, "time": 48.0, "valid/auc": 0.76},
  ]
  s = scale.summarise_run(records, train_examples=2_000_000, evals_per_epoch=10)
  assert s["samples_per_s"] == 2000.0  # the first rate (compilation) left out
  assert s["periodic_valid_s"] == 2.0  # median of 3 s and 1 s
  assert s["full_valid_s"] == 30.0
  assert s["curve"] == [(200, 0.70), (300, 0.75)]
  assert s["epoch_h"] == pytest.approx(1000 / 3600)
  assert s["valid_share_of_epoch"] == pytest.approx(10 * 2.0 / 1000)
  # A validation split smaller than the subsample: the periodic ones log "valid/".
  whole = [r for r in records[:-1] if "valid_subsample/auc" not in r] + [
      {"step": 300, "time": 18.0, "valid/auc": 0.75}]
  assert scale.summarise_run(whole, 10, 10)["curve"] == [(300, 0.75)]


@pytest.mark.slow
def test_scale_benchmark_prepares_trains_and_reports(tmp_path):
  from benchmarks import scale  # noqa: PLC0415
  out = tmp_path / "scale"
  result = scale.main([f"--out={out}", "--size=small", "--steps=40", "--eval_every=20",
                       "--models=mian,din"])
  assert result["prepare"]["num_samples"]["train"] > 0
  assert [r["model"] for r in result["runs"]] == ["mian", "din"]
  for run in result["runs"]:
    assert [s for s, _ in run["curve"]] == [20, 40]
    assert run["samples_per_s"] > 0 and run["peak_rss_gb"] >= run["peak_anon_rss_gb"] > 0
  assert (out / "valid_auc.png").stat().st_size > 0
  assert "| mian |" in (out / "scale.md").read_text()
