"""predict (raw records -> scores with a checkpoint) and the export loader's `Scorer.encode`, on a
hand-written click log: one row out per row in, the test period's scores equal to `evaluate`'s,
unseen values counted, bad rows named or skipped, and encode + score equal to predict."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from configs import tabular as tabular_config
from mian_jax import (config_defaults, encoding, evaluate, export, predict, recorded_config,
                      serving, train)
from mian_jax import data as data_lib
from mian_jax import metrics as metrics_lib
from mian_jax import workdir as workdir_lib
from mian_jax.data import amazon, interaction_log, movielens, tabular, vocab
from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError
from tests.helpers import REPO
from tests.test_amazon import BASE_DAY, DAY

HEADER = ["user_id", "ts", "clicked", "item_id", "category", "price", "age_group", "gender",
          "city", "hour", "device"]
KEYS = ["user_id", "item_id", "ts", "clicked"]
MAX_SEQ_LEN = 5


def _log_rows(num_rows=300, seed=0):
  """A click log in no particular order: 20 users, 30 items; odd items are clicked more often.
  Timestamps are distinct, so (user_id, ts) is a key."""
  rng = np.random.default_rng(seed)
  rows = []
  for k in rng.permutation(num_rows):
    user, item = int(rng.integers(0, 20)), int(rng.integers(0, 30))
    clicked = int(rng.random() < 0.2 + 0.6 * (item % 2))
    rows.append([f"u{user}", str(1_600_000_000 + 60 * int(k)), str(clicked), f"i{item}",
                 f"c{item % 5}", f"{item / 10:.1f}", str(user % 3), "FM"[user % 2],
                 f"x{user % 4}", str(k % 24), "web" if k % 3 == 0 else "ios"])
  return rows


def _write_csv(path, rows, header=HEADER):
  with open(path, "w", newline="") as f:
    f.write(",".join(header) + "\n")
    f.writelines(",".join(row) + "\n" for row in rows)
  return str(path)


def _config(path):
  config = tabular_config.get_config()
  config.data.tabular.path = path
  config.data.max_seq_len = MAX_SEQ_LEN
  config.data.max_bad_row_ratio = 0.0
  config.model.update(embed_dim=4, num_heads=2, gim_dim=8, mlp_dims=(8, 4))
  config.train.update(batch_size=16, num_train_steps=6, learning_rate=3e-2, log_every_steps=6,
                      eval_every_steps=6)
  config.eval.batch_size = 64
  config.checkpoint.every_steps = 6
  # The item table row-sharded over this process's two devices (a 1 x 2 mesh): predict, export
  # and the export loader below read a sharded checkpoint.
  config.sharding.update(model=2, row_shard_fields="item_id")
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """MIAN trained 6 steps on a 300-row CSV log; the log, its rows, the workdir, the cache."""
  root = tmp_path_factory.mktemp("predict")
  rows = _log_rows()
  log = _write_csv(root / "log.csv", rows)
  cache = str(tmp_path_factory.getbasetemp() / "cache")  # the one conftest's fixture sets
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", cache)
    train.train_and_evaluate(_config(log), str(root / "run"))
  return types.SimpleNamespace(root=root, log=log, rows=rows, workdir=str(root / "run"),
                               cache=cache)


@pytest.fixture(scope="module")
def predicted(trained):
  """predict --attention on the whole log the run was prepared from: (stats, output frame)."""
  out = str(trained.root / "scores.parquet")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", trained.cache)
    stats = predict.predict(trained.workdir, trained.log, out, with_attention=True)
  return stats, pq.read_table(out).to_pandas()


def test_one_row_per_input_row_in_input_order_with_the_key_columns(trained, predicted):
  stats, out = predicted
  assert recorded_config.get_config(trained.workdir).sharding.model == 2
  assert list(out.columns[:6]) == [*KEYS, "input_row", "score"]
  assert out["input_row"].tolist() == list(range(300))
  expected = pd.DataFrame(trained.rows, columns=HEADER)[KEYS]
  pd.testing.assert_frame_equal(out[KEYS], expected)
  assert out["score"].between(0, 1).all() and out["score"].std() > 1e-3
  assert (stats["rows_read"], stats["rows_scored"], stats["rows_skipped"]) == (300, 300, 0)
  with open(f"{trained.root}/scores.parquet.stats.json") as f:
    assert json.load(f)["unseen"] == stats["unseen"]
  # One named column per attention weight; each module's weights sum to one.
  for module, names in (("iuim", ["age_group", "gender", "city"]), ("icim", ["hour", "device"])):
    columns = [f"attention.{module}.{name}" for name in names]
    np.testing.assert_allclose(out[columns].sum(axis=1), 1, atol=1e-5)
  assert [c for c in out.columns if c.startswith("attention.ibim.")] == [
      f"attention.ibim.hist{k}" for k in range(MAX_SEQ_LEN)]


def test_scores_of_the_test_period_reproduce_evaluate(trained, predicted):
  _, out = predicted
  config = recorded_config.get_config(trained.workdir)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", trained.cache)
    run, state, _ = workdir_lib.restore_run(trained.workdir, "latest", config)
  reference = evaluate.predict_split(run, state, "test")
  # The prepared test split: the rows of the last 10% of time, in time order (distinct times).
  log = pd.DataFrame(trained.rows, columns=HEADER)
  ts = log["ts"].astype(np.int64).to_numpy()
  in_test = interaction_log.time_split(ts, 0.1, 0.1) == interaction_log.TEST
  test = log.assign(t=ts)[in_test].sort_values("t")
  assert len(test) == len(reference["prob"]) == 30
  np.testing.assert_array_equal(test["clicked"].astype(np.float32), reference["label"])
  scores = out.set_index(["user_id", "ts"]).loc[list(zip(test["user_id"], test["ts"])), "score"]
  np.testing.assert_allclose(scores.to_numpy(), reference["prob"], rtol=0, atol=1e-6)
  ours = metrics_lib.compute_metrics(reference["label"], scores.to_numpy(),
                                     reference["group_id"])
  assert ours["auc"] == evaluate.split_metrics(reference)["auc"]


def _history(rows, field):
  """The behaviours of each row, oldest first: the same user's earlier clicks (a plain loop)."""
  column = HEADER.index(field)
  out = []
  for user, ts, *_ in rows:
    earlier = sorted((int(r[1]), r[column]) for r in rows
                     if r[0] == user and int(r[1]) < int(ts) and r[2] == "1")
    out.append([value for _, value in earlier])
  return out


def test_unseen_values_are_counted_and_bad_rows_named_or_skipped(trained, tmp_path):
  rows = [["u1", "1700000000", "1", "i999", "c1", "1.0", "0", "F", "nowhere", "3", "ios"],
          ["u1", "1700000060", "", "i3", "c3", "0.3", "0", "F", "", "4", "ios"],  # no label
          ["u2", "1700000120", "0", "i4", "c4", "cheap", "1", "M", "x2", "5", "web"],  # line 4
          ["u2", "1700000180", "1", "i5", "c0", "0.5", "1", "M", "x2", "6", "web", "extra"]]
  path = _write_csv(tmp_path / "new.csv", rows)
  done = subprocess.run(
      [sys.executable, "-m", "mian_jax.predict", f"--workdir={trained.workdir}",
       f"--input={path}", f"--output={tmp_path}/out.csv"],
      cwd=REPO, env=dict(os.environ, MIAN_JAX_CACHE=trained.cache), capture_output=True,
      text=True, timeout=120)
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: new.csv line 4 (numeric field 'price' missing or not a "
                         "number) 'cheap': a malformed row (2 in all"), last
  assert not os.path.exists(tmp_path / "out.csv")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", trained.cache)
    stats = predict.predict(trained.workdir, path, str(tmp_path / "out.csv"), skip_bad_rows=True)
  out = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
  assert out["item_id"].tolist() == ["i999", "i3"] and out["clicked"].tolist() == ["1", ""]
  assert (stats["rows_read"], stats["rows_scored"], stats["rows_skipped"]) == (4, 2, 2)
  assert stats["skipped_reasons"] == {"wrong number of fields": 1,
                                      "numeric field 'price' missing or not a number": 1}
  assert stats["unseen"]["item.item_id"] == 1 and stats["unseen"]["user.city"] == 2
  assert stats["unseen"]["context.hour"] == 0


def test_json_lines_are_read_as_their_text_like_csv_cells(trained, tmp_path):
  config = recorded_config.get_config(trained.workdir).data.tabular
  rows = trained.rows[:20]
  with open(tmp_path / "rows.jsonl", "w") as f:
    for row in rows:  # numbers as JSON numbers: read as their text, as a CSV cell would be
      record = dict(zip(HEADER, row))
      record.update(ts=int(record["ts"]), clicked=int(record["clicked"]), hour=int(record["hour"]))
      f.write(json.dumps(record) + "\n\n")
  from_json, _ = predict.read_input(str(tmp_path / "rows.jsonl"), config, False)
  from_csv, _ = predict.read_input(_write_csv(tmp_path / "rows.csv", rows), config, False)
  pd.testing.assert_frame_equal(from_json.log, from_csv.log)
  (tmp_path / "bad.jsonl").write_text(json.dumps(dict(zip(HEADER, rows[0]))) + "\n[1, 2]\n")
  with pytest.raises(DataError, match=r"^bad.jsonl line 2 \(not a JSON object\) '\[1, 2\]'"):
    predict.read_input(str(tmp_path / "bad.jsonl"), config, False)


_LOADER = """
import json, sys
for name in ("flax", "optax", "orbax", "ml_collections", "clu", "pandas", "pyarrow",
             "mian_jax.models", "mian_jax.data", "mian_jax.steps"):
  sys.modules[name] = None  # importing any of them now raises ImportError
from mian_jax import serving
scorer = serving.Scorer.load(sys.argv[1])
with open(sys.argv[2]) as f:
  records = json.load(f)
batch, unseen = scorer.encode(records)
print(json.dumps({"prob": scorer.score(batch)["prob"].tolist(), "unseen": unseen}))
"""


def test_the_export_loader_encodes_raw_records_to_the_scores_of_predict(trained, predicted,
                                                                       tmp_path):
  _, out = predicted
  config = recorded_config.get_config(trained.workdir)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", trained.cache)
    run, state, meta = workdir_lib.restore_run(trained.workdir, "latest", config)
  export.export_run(run, state, str(tmp_path / "export"), platforms=("cpu",), meta=meta)
  # What a server holds: the request's raw values and each user's earlier clicks.
  columns = dict(zip(HEADER, zip(*trained.rows)))
  records = {f"{group}.{name}": list(columns[name])
             for group in ("item", "user", "context")
             for name in config.data.tabular[f"{group}_fields"].replace(":numeric", "")
             .replace(":categorical", "").split(",")}
  records["hist.item_id"] = _history(trained.rows, "item_id")
  records["hist.category"] = _history(trained.rows, "category")
  records["item.price"] = [float(x) for x in records["item.price"]]
  with open(tmp_path / "records.json", "w") as f:
    json.dump(records, f)
  done = subprocess.run([sys.executable, "-c", _LOADER, str(tmp_path / "export"),
                         str(tmp_path / "records.json")], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(result["prob"], out["score"], rtol=0, atol=1e-5)
  assert result["unseen"]["item.item_id"] == 0
  # Errors name the field.
  scorer = serving.Scorer.load(str(tmp_path / "export"))
  with pytest.raises(ValueError, match="field 'user.city' is missing"):
    scorer.encode({k: v for k, v in records.items() if k != "user.city"})
  with pytest.raises(ValueError, match="unknown field 'item.colour'"):
    scorer.encode({**records, "item.colour": records["item.item_id"]})
  with pytest.raises(ValueError, match="behaviour lists 'hist.category' and 'hist.item_id' "
                     "differ in length in row 0"):
    scorer.encode({**records, "hist.category": [["c1"]] + records["hist.category"][1:]})


def test_a_workdir_of_another_source_is_a_one_line_error(tmp_path):
  (tmp_path / "config.json").write_text(config_defaults.get_base_config().to_json())
  with pytest.raises(DataError, match=r"predict scores raw records of the sources \['amazon', "
                     ".* was trained on data.source='synthetic', which has none"):
    predict.predict(str(tmp_path), str(tmp_path / "in.csv"), str(tmp_path / "out.csv"))


def test_history_of_the_input_matches_a_plain_loop(trained):
  config = recorded_config.get_config(trained.workdir).data.tabular
  records, _ = predict.read_input(trained.log, config, False)
  indices, lengths = interaction_log.history_indices(
      records.log, MAX_SEQ_LEN, tabular.behavior_mask(records.log, "clicks"))
  items = records.log["item.item_id"].to_numpy(object)
  for row, expected in enumerate(_history(trained.rows, "item_id")):
    newest_first = expected[::-1][:MAX_SEQ_LEN]
    assert lengths[row] == len(newest_first)
    assert list(items[indices[row, :lengths[row]]]) == newest_first



# ----------------------------------------------------------------------------- Amazon, MovieLens

_FEATURES = ("item.", "hist.", "user.", "context.", "hist_len", "label")


def _assert_columns_equal(encoded, prepared, rows, where):
  for name, column in prepared.items():
    if name.startswith(_FEATURES) and (name != "label" or "label" in encoded):
      np.testing.assert_array_equal(encoded[name][rows], column, err_msg=f"{where}: {name}")


def _stub_scorer(directory):
  """A Scorer on a prepared directory (its vocab/ is an export's), with no model: for encode."""
  schema = schema_lib.read_schema(directory)
  signature = {"inputs": [{"name": name, "dtype": dtype, "shape": list(shape)}
                          for name, (dtype, shape) in export.input_columns(schema).items()],
               "ignored_inputs": list(export.NOT_INPUTS), "outputs": []}
  return serving.Scorer(directory, types.SimpleNamespace(call=lambda *args: {}), {}, signature,
                        {})


def test_amazon_review_records_encode_to_the_prepared_test_split(tmp_path):
  """The raw reviews (label 1), each test target preceded by its negative (label 0, same
  time): their columns equal the prepared test split's, positives and negatives."""
  from tests.test_amazon import data_config, write_random
  reviews = write_random(tmp_path / "raw", num_users=40, num_items=30)
  config = data_config(tmp_path / "raw", protocol="mian", max_seq_len=3)
  amazon.prepare(config, str(tmp_path / "prepared"))
  test = schema_lib.load_split(str(tmp_path / "prepared"), "test")
  asins = vocab.load_vocabularies(str(tmp_path / "prepared"))["item.item_id"].values
  # The target of a user: the last review in (time, file order); test rows are by user.
  last = {}
  for k, (user, _, day) in enumerate(reviews):
    if user not in last or day >= reviews[last[user]][2]:
      last[user] = k
  targets = sorted(last.values(), key=lambda k: reviews[k][0])
  negative = {k: asins[test["item.item_id"][2 * j + 1] - 2] for j, k in enumerate(targets)}
  rows, positive_row, negative_row = [], {}, {}
  for k, (user, asin, day) in enumerate(reviews):
    if k in negative:
      negative_row[k] = len(rows)
      rows.append([user, negative[k], str((BASE_DAY + day) * DAY), "0"])
    positive_row[k] = len(rows)
    rows.append([user, asin, str((BASE_DAY + day) * DAY), "1"])
  path = _write_csv(tmp_path / "reviews.csv", rows,
                    header=["reviewerID", "asin", "unixReviewTime", "label"])
  records, _ = predict.read_input(path, amazon.predict_reader(config), False)
  columns, unseen = amazon.encode_records(records, str(tmp_path / "prepared"), config)
  order = np.ravel([[positive_row[k], negative_row[k]] for k in targets])
  _assert_columns_equal(columns, test, order, "amazon test split")
  assert unseen["item.item_id"] == 0 and unseen["item.category"] == 0
  # The export loader, given what a server keeps (the reviewer's earlier asins, their number,
  # the days since the last one), looks the categories up and encodes the same columns.
  records = {name: [] for name in ("item.item_id", "user.user_id", "user.activity",
                                   "context.year", "context.month", "context.weekday",
                                   "context.gap", "hist.item_id")}
  for k in targets:
    user, asin, day = reviews[k]
    earlier = sorted((d, j, a) for j, (u, a, d) in enumerate(reviews)
                     if u == user and (d, j) < (day, k))
    for candidate in (asin, negative[k]):
      for name, value in (("item.item_id", candidate), ("user.user_id", user),
                          ("user.activity", len(earlier)),
                          ("context.gap", day - earlier[-1][0] if earlier else None),
                          ("hist.item_id", [a for _, _, a in earlier])):
        records[name].append(value)
      for unit in ("year", "month", "weekday"):
        records[f"context.{unit}"].append((BASE_DAY + day) * DAY)
  batch, unseen = _stub_scorer(str(tmp_path / "prepared")).encode(records)
  _assert_columns_equal(batch, test, slice(None), "Scorer.encode")
  assert unseen["item.category"] == unseen["hist.category"] == 0


def test_amazon_behaviors_in_order_match_a_plain_loop():
  rng = np.random.default_rng(3)
  users, seconds = rng.integers(0, 4, 40).astype(str), rng.integers(0, 5, 40).astype(float)
  is_review = rng.random(40) < 0.7
  indices, counts = amazon.behaviors_in_order(users, seconds, is_review, 3)
  for i in range(40):
    earlier = [j for j in sorted(range(40), key=lambda j: (seconds[j], j))
               if users[j] == users[i] and is_review[j] and (seconds[j], j) < (seconds[i], i)]
    assert counts[i] == len(earlier)
    expected = earlier[::-1][:3]
    assert list(indices[i, :len(expected)]) == expected and (indices[i, len(expected):] == -1).all()


def _random_movielens(directory, num_users=25, num_movies=15, seed=0):
  """Random ML-100K files: each user rates 3-10 distinct movies, hours with ties."""
  from tests.test_movielens import FLAGS, write_100k
  rng = np.random.default_rng(seed)
  ratings = [(u, int(m), int(rng.integers(1, 6)), 3600 * int(rng.integers(1, 200)))
             for u in range(1, num_users + 1)
             for m in rng.choice(np.arange(1, num_movies + 1), rng.integers(3, 11), replace=False)]
  ratings = [ratings[k] for k in rng.permutation(len(ratings))]
  users = [f"{u}|{rng.integers(10, 70)}|{'MF'[u % 2]}|job{u % 4}|{10000 + 37 * u}"
           for u in range(1, num_users + 1)]
  items = [f"{m}|M{m} ({1970 + 3 * m})|01-Jan-{1970 + 3 * m}||http://m|{FLAGS(m % 19, 7)}"
           for m in range(1, num_movies + 1)]
  write_100k(directory, ratings=ratings, users=users, items=items)
  return ratings


def test_movielens_rating_records_encode_to_the_prepared_splits(tmp_path):
  from tests.test_movielens import config_for
  ratings = _random_movielens(tmp_path / "raw")
  config = config_for(str(tmp_path / "raw"), max_seq_len=3)
  directory, _ = data_lib.ensure_prepared(config.data)
  path = _write_csv(tmp_path / "ratings.csv",
                    [[str(u), str(m), str(t), str(int(r >= 4))] for u, m, r, t in ratings],
                    header=["user", "movie", "timestamp", "label"])
  records, _ = predict.read_input(path, movielens.predict_reader(config.data), False)
  columns, unseen = movielens.encode_records(records, directory, config.data)
  user, seconds = np.array([r[0] for r in ratings]), np.array([r[3] for r in ratings])
  split = interaction_log.time_split(seconds, 0.2, 0.2)
  chronological = np.lexsort((np.arange(len(ratings)), user, seconds))
  for code, name in enumerate(schema_lib.SPLITS):
    rows = chronological[split[chronological] == code]
    _assert_columns_equal(columns, schema_lib.load_split(directory, name), rows, name)
  # The export loader, given each rating's movie, user, time, the seconds since the user's
  # previous rating and the earlier movies, looks the profiles up and encodes the same columns.
  test = schema_lib.load_split(directory, "test")
  test_rows = chronological[split[chronological] == interaction_log.TEST]
  records = {name: [] for name in ("item.movie_id", "user.user_id", "context.hour",
                                   "context.weekday", "context.month",
                                   "context.time_since_last", "hist.movie_id")}
  for i in test_rows:
    u, m, _, t = ratings[i]
    earlier = sorted((tt, j, mm) for j, (uu, mm, _, tt) in enumerate(ratings)
                     if uu == u and tt < t)  # ties in file order, as preparation keeps them
    for name, value in (("item.movie_id", m), ("user.user_id", u),
                        ("context.time_since_last", t - earlier[-1][0] if earlier else None),
                        ("hist.movie_id", [mm for _, _, mm in earlier]),
                        ("context.hour", t), ("context.weekday", t), ("context.month", t)):
      records[name].append(value)
  batch, _ = _stub_scorer(directory).encode(records)
  _assert_columns_equal(batch, test, slice(None), "Scorer.encode")
  assert unseen["item.movie_id"] == int((~np.isin(
      [r[1] for r in ratings], [r[1] for r, s in zip(ratings, split) if s == 0])).sum())


@pytest.mark.slow
def test_predict_on_a_movielens_workdir_reproduces_evaluate_on_the_test_period(tmp_path):
  from tests.test_movielens import config_for
  ratings = _random_movielens(tmp_path / "raw", seed=1)
  config = config_for(str(tmp_path / "raw"), max_seq_len=3)
  config.model.update(embed_dim=4, num_heads=2, gim_dim=8, mlp_dims=(8, 4))
  config.train.update(batch_size=16, num_train_steps=4, log_every_steps=4, eval_every_steps=4)
  config.eval.batch_size = 32
  config.checkpoint.every_steps = 4
  train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [[str(u), str(m), str(t), str(int(r >= 4))] for u, m, r, t in ratings]
  path = _write_csv(tmp_path / "ratings.csv", rows, header=["user", "movie", "timestamp", "label"])
  stats = predict.predict(str(tmp_path / "run"), path, str(tmp_path / "scores.parquet"))
  out = pq.read_table(tmp_path / "scores.parquet").to_pandas()
  assert list(out.columns) == ["user", "movie", "timestamp", "label", "input_row", "score"]
  assert out["input_row"].tolist() == list(range(len(rows)))
  assert out[["user", "movie"]].values.tolist() == [r[:2] for r in rows]
  assert stats["rows_scored"] == len(rows) and stats["step"] == 4
  run, state, _ = workdir_lib.restore_run(str(tmp_path / "run"), "latest", config)
  reference = evaluate.predict_split(run, state, "test")
  seconds = np.array([r[3] for r in ratings])
  split = interaction_log.time_split(seconds, 0.2, 0.2)
  chronological = np.lexsort((np.arange(len(ratings)), [r[0] for r in ratings], seconds))
  test_rows = chronological[split[chronological] == interaction_log.TEST]
  np.testing.assert_allclose(out["score"].to_numpy()[test_rows], reference["prob"], atol=1e-6)


# ------------------------------------------------ issue 23: silent wrong input, keys, messages

@pytest.fixture(scope="module")
def exported(trained):
  """The trained run exported by the command (CPU only)."""
  out = str(trained.root / "exported")
  done = subprocess.run([sys.executable, "-m", "mian_jax.export", f"--workdir={trained.workdir}",
                         f"--out={out}", "--platforms=cpu"], cwd=REPO,
                        env=dict(os.environ, MIAN_JAX_CACHE=trained.cache), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return out


def _edit_json(path, change):
  with open(path) as f:
    content = json.load(f)
  change(content)
  with open(path, "w") as f:
    json.dump(content, f)


def _swap_first_two(content):
  content["values"][:2] = content["values"][1::-1]


@pytest.mark.slow
@pytest.mark.parametrize("name, change", [
    ("vocab/item.item_id.json", _swap_first_two),
    ("vocab/encoders.json", lambda c: c["fields"]["item.price"].update(mean=0.0))])
def test_an_edited_vocabulary_or_encoder_of_an_export_is_refused(exported, tmp_path, name,
                                                                change):
  copy = str(tmp_path / "export")
  subprocess.run(["cp", "-r", exported, copy], check=True)
  serving.Scorer.load(copy)
  _edit_json(os.path.join(copy, name), change)
  with pytest.raises(ValueError, match=f"{copy}/{name} differs from the checksum in "
                     "manifest.json") as error:
    serving.Scorer.load(copy)
  assert "\n" not in str(error.value)


def test_encode_refuses_a_string_where_a_list_is_expected(exported, trained):
  scorer = serving.Scorer.load(exported)
  row = dict(zip(HEADER, trained.rows[0]))
  records = {f"{group}.{name}": [row[name]] for group, names in (
      ("item", ("item_id", "category", "price")), ("user", ("age_group", "gender", "city")),
      ("context", ("hour", "device"))) for name in names}
  records["item.price"] = [float(row["price"])]
  records.update({"hist.item_id": [["i1"]], "hist.category": [["c1"]]})
  batch, _ = scorer.encode(records)
  assert batch["hist_len"].tolist() == [1]
  with pytest.raises(ValueError, match=r"behaviour field 'hist.item_id' row 0 is a string "
                     r"\('i1'\); give a list of its behaviours, e.g. \['i1'\]"):
    scorer.encode({**records, "hist.item_id": ["i1"]})
  with pytest.raises(ValueError, match=r"field 'item.item_id' is a string \('i1'\)"):
    scorer.encode({**records, "item.item_id": "i1"})


@pytest.mark.slow
def test_predict_flags_and_input_errors_are_one_line(trained, tmp_path):
  """--batch_size=-5, a duplicated header column and a ';'-separated CSV, through the
  command."""
  good = _write_csv(tmp_path / "in.csv", trained.rows[:10])
  dup = _write_csv(tmp_path / "dup.csv", [r + [r[8]] for r in trained.rows[:10]],
                   header=HEADER + ["city"])
  with open(tmp_path / "semi.csv", "w") as f:
    f.writelines(";".join(r) + "\n" for r in [HEADER, *trained.rows[:10]])
  for path, flag, message in [
      (good, "--batch_size=-5", "error: --batch_size=-5: expected a positive number of rows, "
       "or 0 for the run's eval.batch_size"),
      (dup, "--batch_size=0", "error: dup.csv: the header names column 'city' 2 times; rename "
       "or drop the copies"),
      (str(tmp_path / "semi.csv"), "--batch_size=0", "error: semi.csv: the header was read as "
       "one column, 'user_id;ts;clicked;item_id;category;price;age_group;gender;c', with "
       "data.tabular.csv_sep=','; if ';' separates the fields, pass "
       "--config.data.tabular.csv_sep=';'")]:
    done = subprocess.run(
        [sys.executable, "-m", "mian_jax.predict", f"--workdir={trained.workdir}",
         f"--input={path}", f"--output={tmp_path}/out.csv", flag],
        cwd=REPO, env=dict(os.environ, MIAN_JAX_CACHE=trained.cache), capture_output=True,
        text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in done.stderr
  assert not os.path.exists(tmp_path / "out.csv")


def test_predict_without_labels_warns_that_every_history_is_empty(trained, tmp_path):
  unlabelled = [HEADER[:2] + HEADER[3:]] + [r[:2] + r[3:] for r in trained.rows]
  path = str(tmp_path / "unlabelled.csv")
  with open(path, "w") as f:
    f.writelines(",".join(r) + "\n" for r in unlabelled)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", trained.cache)
    stats = predict.predict(trained.workdir, path, str(tmp_path / "out.csv"))
    labelled = predict.predict(trained.workdir, trained.log, str(tmp_path / "labelled.csv"))
  assert labelled["warnings"] == []
  [warning] = stats["warnings"]
  assert warning.startswith("unlabelled.csv has no label column 'clicked': no row is taken as a "
                            "past click, so every behaviour history is empty")
  assert "leave the label empty on the rows to score" in warning


def test_integral_floats_of_a_categorical_parquet_column_read_as_their_integers(trained,
                                                                               tmp_path):
  """hour written by Parquet as floats (9.0, and a null) scores as the CSV's "9"; a value that
  is not whole (9.5) is a one-line error."""
  frame = pd.DataFrame(trained.rows[:40], columns=HEADER)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", trained.cache)
    as_text = predict.predict(trained.workdir, _write_csv(tmp_path / "in.csv", trained.rows[:40]),
                              str(tmp_path / "text.parquet"))
    floats = frame.assign(hour=frame["hour"].astype(float))
    floats.loc[3, "hour"] = np.nan
    floats.to_parquet(tmp_path / "floats.parquet")
    as_floats = predict.predict(trained.workdir, str(tmp_path / "floats.parquet"),
                                str(tmp_path / "floats_out.parquet"))
    frame.assign(hour=frame["hour"].astype(float) + 0.5).to_parquet(tmp_path / "half.parquet")
    with pytest.raises(DataError, match=r"half.parquet: categorical field 'hour' is a column of "
                       r"floats holding 12.5, which is not a whole number"):
      predict.predict(trained.workdir, str(tmp_path / "half.parquet"), str(tmp_path / "x.pq"))
  assert as_floats["unseen"]["context.hour"] == as_text["unseen"]["context.hour"] + 1  # the null
  text = pq.read_table(tmp_path / "text.parquet").to_pandas()["score"].to_numpy()
  numbers = pq.read_table(tmp_path / "floats_out.parquet").to_pandas()["score"].to_numpy()
  same = np.arange(40) != 3
  np.testing.assert_allclose(numbers[same], text[same], rtol=0, atol=1e-6)


def test_evaluate_predictions_carry_the_row_and_the_raw_item_id(trained):
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("MIAN_JAX_CACHE", trained.cache)
    config = recorded_config.get_config(trained.workdir)
    result = evaluate.evaluate_checkpoint(config, trained.workdir, "latest", "test", True)
  out = pq.read_table(os.path.join(trained.workdir, "eval",
                                   f"test_predictions_step{result['step']}.parquet")).to_pandas()
  assert list(out.columns[:4]) == ["row", "item.item_id", "item_id", "score"]
  log = pd.DataFrame(trained.rows, columns=HEADER)
  ts = log["ts"].astype(np.int64).to_numpy()
  test = log.assign(t=ts)[interaction_log.time_split(ts, 0.1, 0.1) == interaction_log.TEST]
  test = test.sort_values("t")  # the prepared test split: the last 10% of time, in time order
  assert out["row"].tolist() == list(range(len(test)))
  known = out["item.item_id"] != encoding.OOV_ID
  assert known.sum() > 20
  assert out["item_id"][known].tolist() == test["item_id"][known.to_numpy()].tolist()
  assert out["item_id"][~known].isna().all()
  np.testing.assert_array_equal(out["label"], test["clicked"].astype(np.float32))
