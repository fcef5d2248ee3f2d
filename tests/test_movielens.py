"""MovieLens source: a hand-worked tiny ML-100K, ML-1M parsing, leakage, errors, the prepare CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from configs import movielens as movielens_config
from mian_jax import data as data_lib
from mian_jax.data import interaction_log, movielens
from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError

H = 3600
FLAGS = lambda *on: "|".join("1" if i in on else "0" for i in range(19))  # noqa: E731
USERS = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|17|M|student|T8H1N"]
ITEMS = [f"1|A (1995)|01-Jan-1995||http://a|{FLAGS(3, 4)}",  # Animation (first of two), 1995
         f"2|B (1987)|01-Jan-1987||http://b|{FLAGS(1, 2)}",  # Action, 1987
         f"3|unknown||||{FLAGS()}",  # no genre, no date
         f"4|D (1996)|01-Jan-1996||http://d|{FLAGS(8)}"]  # Drama, 1996
# user, movie, rating, time. File order is not time order; u1's m2 and m3 are simultaneous.
RATINGS = [(2, 4, 5, 60 * H), (1, 1, 5, 1 * H), (1, 2, 3, 2 * H), (1, 3, 4, 2 * H),
           (3, 4, 3, 80 * H), (2, 2, 4, 3 * H), (1, 4, 2, 50 * H), (2, 1, 1, 4 * H),
           (3, 1, 5, 5 * H), (2, 3, 4, 70 * H)]


def write_100k(directory, ratings=RATINGS, users=USERS, items=ITEMS, extra_data_lines=()):
  os.makedirs(directory, exist_ok=True)
  lines = ["\t".join(map(str, r)) for r in ratings] + list(extra_data_lines)
  for name, rows in (("u.data", lines), ("u.user", users), ("u.item", items)):
    with open(os.path.join(directory, name), "w", encoding="latin-1") as f:
      f.write("\n".join(rows) + "\n")
  return str(directory)


def config_for(raw_dir, variant="100k", **overrides):
  config = movielens_config.get_config(variant)
  config.data.raw_dir = raw_dir
  config.data.max_seq_len = 2  # truncation is visible in the hand-worked example
  config.data.movielens.valid_fraction = 0.2
  config.data.movielens.test_fraction = 0.2
  for key, value in overrides.items():
    node = config.data
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


def test_hand_worked_example(tmp_path):
  schema, splits, stats, _ = movielens.generate(config_for(write_100k(tmp_path / "raw")).data)
  # 10 ratings sorted by time: 1,2,2,3,4,5 h = train; t_valid = 6th = 50 h; t_test = 8th = 70 h.
  assert schema.num_examples == (("train", 6), ("valid", 2), ("test", 2))
  assert (stats["num_users"], stats["num_items"], stats["num_categories"]) == (3, 4, 4)
  tr, va, te = splits["train"], splits["valid"], splits["test"]
  # Train rows, chronological (ties in file order): u1m1, u1m2, u1m3, u2m2, u2m1, u3m1.
  # Movie vocabulary from train only: "1","2","3" -> 2,3,4; movie 4 (valid/test only) -> OOV 1.
  np.testing.assert_array_equal(tr["item.movie_id"], [2, 3, 4, 3, 2, 2])
  np.testing.assert_array_equal(tr["label"], [1, 0, 1, 1, 0, 1])  # rating >= 4
  np.testing.assert_array_equal(tr["group_id"], [0, 0, 0, 1, 1, 2])
  # u1's m2 and m3 share a timestamp: neither sees the other, both see only m1.
  np.testing.assert_array_equal(tr["hist.movie_id"], [[0, 0], [2, 0], [2, 0], [0, 0], [3, 0],
                                                      [0, 0]])
  np.testing.assert_array_equal(tr["hist_len"], [0, 1, 1, 0, 1, 0])
  # Genres (train vocab "Action","Animation","unknown" -> 2,3,4; Drama -> OOV 1).
  np.testing.assert_array_equal(tr["item.genre"], [3, 2, 4, 2, 3, 3])
  # Valid: u1m4 @50h sees m1,m2,m3 -> last two, newest first (m3, m2); u2m4 @60h sees m2, m1
  # -> (m1, m2).
  np.testing.assert_array_equal(va["item.movie_id"], [1, 1])
  np.testing.assert_array_equal(va["hist.movie_id"], [[4, 3], [2, 3]])
  np.testing.assert_array_equal(va["hist.genre"], [[4, 2], [3, 2]])
  np.testing.assert_array_equal(va["label"], [0, 1])
  # Test: u2m3 @70h sees m2,m1,m4 -> newest first (m4=OOV, m1); u3m4 @80h sees m1.
  np.testing.assert_array_equal(te["item.movie_id"], [4, 1])
  np.testing.assert_array_equal(te["hist.movie_id"], [[1, 2], [2, 0]])
  np.testing.assert_array_equal(te["hist.genre"], [[1, 3], [3, 0]])
  np.testing.assert_array_equal(te["hist_len"], [2, 1])
  # Age groups 24 -> 18, 53 -> 50, 17 -> 1; tokens "1","18","50" -> 2,3,4.
  np.testing.assert_array_equal(tr["user.age_group"], [3, 3, 3, 4, 4, 2])
  # Release years: 1995/1996 -> "1995-1999", 1987 -> "1985-1989", none -> "unknown".
  np.testing.assert_array_equal(tr["item.release_year"], [3, 2, 4, 2, 3, 3])
  # time_since_last: none for a first rating, 1 h -> lt_1d; vocab "lt_1d","none" -> 2,3;
  # valid gaps of 46 h and 56 h -> lt_1w, unseen in training -> OOV.
  np.testing.assert_array_equal(tr["context.time_since_last"], [3, 2, 2, 3, 2, 3])
  np.testing.assert_array_equal(va["context.time_since_last"], [1, 1])
  # Hours 1,2,2,3,4,5 (UTC) -> 2..6.
  np.testing.assert_array_equal(tr["context.hour"], [2, 3, 3, 4, 5, 6])
  for split in schema_lib.SPLITS:
    schema_lib.validate_columns(schema, split, splits[split])


def _reference_history(log, t_max):
  """Brute force: for each row, the movie ids of the same user's strictly earlier rows."""
  out = []
  for i in range(len(log)):
    earlier = log[(log.user == log.user[i]) & (log.timestamp < log.timestamp[i])]
    earlier = earlier.sort_values("timestamp", kind="stable")
    out.append(earlier["item.movie_id"].tolist()[-t_max:])
  return out


def test_no_future_leakage_against_brute_force():
  rng = np.random.default_rng(0)
  n = 300
  log = pd.DataFrame({
      "user": rng.integers(5, size=n), "timestamp": rng.integers(40, size=n),
      "label": rng.integers(2, size=n).astype(np.float32), "split": np.zeros(n, np.int8),
      "item.movie_id": np.arange(n).astype(str)})  # unique items identify the rows
  _, splits, _ = interaction_log.build_examples(log, {"item": (("movie_id", "categorical"),)},
                                                ("movie_id",), 4, "test")
  cols = splits["train"]
  vocab = np.asarray(sorted(log["item.movie_id"]), dtype=object)
  decode = lambda ids: [vocab[i - 2] for i in ids if i]  # noqa: E731
  expected = _reference_history(log, 4)
  by_item = {item: k for k, item in enumerate(log["item.movie_id"])}
  for row in range(n):
    k = by_item[vocab[cols["item.movie_id"][row] - 2]]
    got = decode(cols["hist.movie_id"][row])
    # Same set of rows in time order (ties between behaviours may be ordered either way).
    assert sorted(got) == sorted(expected[k])
    assert all(log.timestamp[by_item[x]] < log.timestamp[k] for x in got)


def test_ensure_prepared_writes_stats_with_the_checksum(tmp_path):
  config = config_for(write_100k(tmp_path / "raw"))
  config.data.prepared_dir = str(tmp_path / "prepared")
  directory, schema = data_lib.ensure_prepared(config.data)
  with open(os.path.join(directory, "stats.json")) as f:
    stats = json.load(f)
  assert stats["checksum"] == schema_lib.dataset_checksum(directory)
  assert stats["num_samples"] == {"train": 6, "valid": 2, "test": 2}
  assert {"num_users", "num_items", "num_categories", "protocol", "bad_rows"} <= set(stats)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
  assert schema.features.behavior_fields == ("movie_id", "genre")


def test_movielens_1m_files(tmp_path):
  raw = tmp_path / "ml-1m"
  raw.mkdir()
  (raw / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n", "latin-1")
  (raw / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                  "2::Jumanji (1995)::Adventure|Children's|Fantasy\n", "latin-1")
  (raw / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978302109\n"
                                   "2::1::4::978301968\n2::2::2::978300275\n"
                                   "1::2::4::978400000\n", "latin-1")
  config = config_for(str(tmp_path), variant="1m")  # finds the ml-1m folder inside raw_dir
  config.data.movielens.valid_fraction = 0.0
  config.data.movielens.test_fraction = 0.2
  schema, splits, stats, _ = movielens.generate(config.data)
  assert stats["source"] == "movielens-1m" and stats["num_categories"] == 2
  tr = splits["train"]
  # Train order by time: u2m2 (..275), u1m1 (..760), u2m1 (..968), u1m2 (2109).
  np.testing.assert_array_equal(tr["item.movie_id"], [3, 2, 2, 3])
  np.testing.assert_array_equal(tr["item.genre"], [2, 3, 3, 2])  # Adventure=2, Animation=3
  np.testing.assert_array_equal(tr["hist.movie_id"], [[0, 0], [0, 0], [3, 0], [2, 0]])
  np.testing.assert_array_equal(tr["user.age_group"], [3, 2, 3, 2])  # "1"=2, "56"=3
  np.testing.assert_array_equal(splits["test"]["hist.movie_id"], [[3, 2]])  # newest first


def test_config_arguments():
  assert movielens_config.get_config().data.movielens.variant == "100k"
  assert movielens_config.get_config("1m").data.movielens.variant == "1m"
  assert movielens_config.get_config("variant=1m").data.movielens.variant == "1m"
  for bad in ("2m", "variant=2m", "size=1m"):
    with pytest.raises(ValueError):
      movielens_config.get_config(bad)


def test_missing_data_is_explained(tmp_path, monkeypatch):
  monkeypatch.delenv(movielens.ENV_VAR, raising=False)
  with pytest.raises(DataError, match="ml-100k.zip"):
    movielens.generate(config_for("").data)
  raw = write_100k(tmp_path / "raw")
  os.remove(os.path.join(raw, "u.item"))
  with pytest.raises(DataError, match="u.item not found"):
    movielens.generate(config_for(raw).data)


def test_empty_file_fails(tmp_path):
  raw = write_100k(tmp_path / "raw")
  open(os.path.join(raw, "u.data"), "w").close()
  with pytest.raises(DataError, match="u.data is empty"):
    movielens.generate(config_for(raw).data)


def test_malformed_rows_are_counted_and_limited(tmp_path):
  raw = write_100k(tmp_path / "raw", extra_data_lines=["1\t2\tthree\t100", "9\t1\t4\t100",
                                                       "garbage"])
  _, splits, stats, _ = movielens.generate(config_for(raw, max_bad_row_ratio=0.5).data)
  bad = stats["bad_rows"]["u.data"]
  assert (bad["rows"], bad["bad"]) == (13, 3)
  assert set(bad["reasons"]) == {"expected 4 '\\t'-separated fields",
                                 "rating is not an integer in [0, None]", "unknown user"}
  assert sum(len(s["label"]) for s in splits.values()) == 10  # the same 10 good ratings
  with pytest.raises(DataError, match=r"u.data: 3 of 13 rows are malformed"):
    movielens.generate(config_for(raw, max_bad_row_ratio=0.1).data)


def test_prepare_cli_prints_stats_and_checksum(tmp_path):
  raw = write_100k(tmp_path / "raw")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"), MIAN_JAX_MOVIELENS_DIR=raw)
  out = subprocess.run([sys.executable, "-m", "mian_jax.prepare",
                        "--config=configs/movielens.py", "--config.data.max_seq_len=2",
                        f"--config.data.prepared_dir={tmp_path / 'p'}"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  checksum = schema_lib.dataset_checksum(str(tmp_path / "p"))
  assert f"checksum: {checksum}" in out.stdout
  assert '"num_users": 3' in out.stdout


@pytest.mark.skipif(not os.environ.get("MIAN_JAX_MOVIELENS_DIR"),
                    reason="set MIAN_JAX_MOVIELENS_DIR to the unzipped ml-100k folder to run")
def test_real_movielens_100k():
  config = movielens_config.get_config("100k")  # data.raw_dir = $MIAN_JAX_MOVIELENS_DIR
  assert config.data.raw_dir == os.environ["MIAN_JAX_MOVIELENS_DIR"]
  schema, splits, stats, _ = movielens.generate(config.data)
  assert stats["num_ratings"] == 100_000
  assert (stats["num_users"], stats["num_items"], stats["num_categories"]) == (943, 1682, 19)
  assert sum(schema.size(s) for s in schema_lib.SPLITS) == 100_000
  assert stats["bad_rows"]["u.data"]["bad"] == 0
  assert splits["train"]["label"].mean() == pytest.approx(0.55, abs=0.05)


def test_implausible_timestamps_are_counted_with_their_unit(tmp_path):
  ms = 893_286_638_000  # 1998-04-22 in milliseconds
  raw = write_100k(tmp_path / "raw", extra_data_lines=[f"1\t4\t4\t{ms}", f"2\t1\t4\t{2**62}",
                                                       f"3\t2\t4\t{10**20}", "3\t3\t4\t-5"])
  _, _, stats, _ = movielens.generate(config_for(raw, max_bad_row_ratio=0.5).data)
  bad = stats["bad_rows"]["u.data"]
  assert bad["reasons"] == {
      "timestamp is not an integer in [0, None]": 2,  # 10**20 overflows int64; -5
      "timestamp is not Unix seconds in 1970..2099": 1,  # 2**62
      "timestamp is not Unix seconds in 1970..2099; it looks like milliseconds (divide by "
      "1000)": 1}
  assert stats["time_range"]["test"][1] == 80 * H  # no rating dated in the far future
  assert stats["num_ratings"] == len(RATINGS)
  with pytest.raises(DataError, match=r"u.data: 4 of 14 rows are malformed.*first: line 13 "
                     r"\(timestamp is not an integer") as e:
    movielens.generate(config_for(raw).data)
  assert "looks like milliseconds" in str(e.value) and "\n" not in str(e.value)
