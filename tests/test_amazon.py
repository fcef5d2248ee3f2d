"""The Amazon source: parsing, protocols (hand-worked examples), negatives, leakage, errors."""

import ast
import dataclasses
import datetime
import functools
import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from configs import amazon_like as amazon_like_config
from configs import books, electronics
from mian_jax import cli, config_checks, train
from mian_jax import data as data_lib
from mian_jax.data import amazon, amazon_raw
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError

DAY = 86400
BASE_DAY = (datetime.date(2013, 12, 25) - datetime.date(1970, 1, 1)).days  # a Wednesday

# (reviewer, asin, day offset): the file order is not the time order on purpose.
GOOD_REVIEWS = [
    ("uA", "i1", 10), ("uA", "i2", 12), ("uA", "i3", 11), ("uB", "i2", 5),
    ("uB", "i5", 5), ("uA", "i4", 40), ("uB", "i1", 100), ("uC", "i3", 1), ("uC", "i6", 3),
]
NO_META_REVIEW = ("uC", "i9", 2)  # item i9 has no metadata: dropped and counted
BAD_REVIEW_LINES = ['{"reviewerID": "uX", "asin": ', "[1, 2]",
                    '{"reviewerID": "uX", "asin": "i1"}']  # malformed, not an object, missing

META_LINES = [
    "{'asin': 'i1', 'categories': [['Books', 'Fiction'], ['Books', 'Sci']]}",
    "{'asin': 'i2', 'title': 'Two', 'categories': [['Books', 'Fiction']]}",
    "{'asin': 'i3', 'categories': [['Books', 'Sci']]}",
    "{'asin': 'i4', 'title': \"Rock 'n' Roll\", 'categories': [['Books', 'Art']]}",
    "{'asin': 'i5', 'categories': [['Books', 'Art'], ['Books', 'Fiction']]}",
    "{'asin': 'i6', oops}",  # malformed, counted; the next line still gives i6 its category
    "{'asin': 'i6', 'categories': [['Books', 'Sci']]}",
    "{'asin': 'i7', 'categories': [['Unreviewed']]}",  # skipped without parsing
    "",
]


def _review_line(user, asin, day):
  return json.dumps({"reviewerID": user, "asin": asin, "reviewerName": "x",
                     "helpful": [0, 0], "reviewText": "It's \"fine\".", "overall": 4.0,
                     "summary": "ok", "unixReviewTime": (BASE_DAY + day) * DAY,
                     "reviewTime": "01 1, 2014"})


def _write(path, lines, gz):
  text = "\n".join(lines) + "\n"
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)


def write_tiny(directory, gz=True, bad=True):
  """Writes the tiny Books file pair; returns the raw directory."""
  os.makedirs(directory, exist_ok=True)
  reviews = [_review_line(*r) for r in GOOD_REVIEWS]
  if bad:
    reviews = reviews[:3] + BAD_REVIEW_LINES + reviews[3:] + [_review_line(*NO_META_REVIEW)]
  suffix = ".gz" if gz else ""
  _write(os.path.join(directory, "reviews_Books_5.json" + suffix), reviews, gz)
  _write(os.path.join(directory, "meta_Books.json" + suffix), META_LINES, gz)
  return str(directory)


def data_config(raw_dir, protocol="mian", max_seq_len=2, max_bad_row_ratio=0.5, seed=0):
  config = books.get_config(f"protocol={protocol}").data
  config.raw_dir = str(raw_dir)
  config.max_seq_len = max_seq_len
  config.max_bad_row_ratio = max_bad_row_ratio
  config.seed = seed
  return config


def prepare(tmp_path, **kwargs):
  raw = write_tiny(tmp_path / "raw", gz=kwargs.pop("gz", True))
  out = str(tmp_path / "prepared")
  amazon.prepare(data_config(raw, **kwargs), out)
  schema = schema_lib.read_schema(out)
  splits = {s: {k: np.asarray(v) for k, v in schema_lib.load_split(out, s, schema).items()}
            for s in schema_lib.SPLITS}
  with open(os.path.join(out, "stats.json")) as f:
    stats = json.load(f)
  return schema, splits, stats


# Ids: sorted strings from 2. Users uA=2, uB=3, uC=4; items i1..i6 = 2..7;
# categories (din/mian: last of last path) Art=2, Fiction=3, Sci=4.
U = {"uA": 2, "uB": 3, "uC": 4}
I = {f"i{k}": k + 1 for k in range(1, 7)}
CAT = {"Art": 2, "Fiction": 3, "Sci": 4}
ITEM_CAT = {"i1": "Sci", "i2": "Fiction", "i3": "Sci", "i4": "Art", "i5": "Fiction", "i6": "Sci"}


def _context(day):
  date = datetime.date(2013, 12, 25) + datetime.timedelta(days=day)
  return ({2013: 2, 2014: 3}[date.year], date.month - 1 + 2, date.weekday() + 2)


def _positives(split):
  """Rows 0, 2, 4, ... are positives; rows 1, 3, 5, ... their negatives."""
  return {k: v[0::2] for k, v in split.items()}


def test_mian_protocol_hand_worked(tmp_path):
  schema, splits, stats = prepare(tmp_path, protocol="mian", max_seq_len=2)
  # Time-ordered: uA i1(10) i3(11) i2(12) i4(40); uB i2(5) i5(5, file order) i1(100);
  # uC i3(1) i6(3). Train predicts reviews 1..n-3, valid n-2, test n-1 (T = 2).
  expected = {
      # split: [(user, target, hist, gap bucket, activity bucket, day)]
      "train": [("uA", "i3", ["i1"], 1, 1, 11)],
      "valid": [("uA", "i2", ["i1", "i3"], 1, 2, 12), ("uB", "i5", ["i2"], 0, 1, 5)],
      "test": [("uA", "i4", ["i3", "i2"], 3, 2, 40), ("uB", "i1", ["i2", "i5"], 5, 2, 100),
               ("uC", "i6", ["i3"], 2, 1, 3)],
  }
  for split, rows in expected.items():
    p = _positives(splits[split])
    assert len(splits[split]["label"]) == 2 * len(rows)
    np.testing.assert_array_equal(splits[split]["label"], np.tile([1.0, 0.0], len(rows)))
    for k, (user, target, hist, gap, activity, day) in enumerate(rows):
      assert p["group_id"][k] == U[user] - 2 and p["user.user_id"][k] == U[user]
      assert p["item.item_id"][k] == I[target]
      assert p["item.category"][k] == CAT[ITEM_CAT[target]]
      assert p["hist_len"][k] == len(hist)
      # `hist` is written oldest first; the prepared format stores it newest first.
      np.testing.assert_array_equal(p["hist.item_id"][k],
                                    [I[h] for h in hist[::-1]] + [0] * (2 - len(hist)))
      np.testing.assert_array_equal(p["hist.category"][k],
                                    [CAT[ITEM_CAT[h]] for h in hist[::-1]] + [0] * (2 - len(hist)))
      assert p["context.gap"][k] == gap + 2
      assert p["user.activity"][k] == activity + 2
      year, month, weekday = _context(day)
      assert (p["context.year"][k], p["context.month"][k], p["context.weekday"][k]) == (
          year, month, weekday)
    # Negatives share everything but the candidate and the label with their positive.
    for name, column in splits[split].items():
      if not name.startswith("item.") and name != "label":
        np.testing.assert_array_equal(column[0::2], column[1::2], err_msg=name)
  positives = {"uA": {"i1", "i2", "i3", "i4"}, "uB": {"i1", "i2", "i5"}, "uC": {"i3", "i6"}}
  inverse_item = {v: k for k, v in I.items()}
  inverse_user = {v: k for k, v in U.items()}
  for split in schema_lib.SPLITS:
    neg = splits[split]["item.item_id"][1::2]
    users = splits[split]["user.user_id"][1::2]
    for n, u in zip(neg, users):
      assert inverse_item[n] not in positives[inverse_user[u]]
    cats = splits[split]["item.category"][1::2]
    np.testing.assert_array_equal(cats, [CAT[ITEM_CAT[inverse_item[n]]] for n in neg])
  f = schema.features
  assert [(x.name, x.vocab_size) for x in f.item_fields] == [("item_id", 8), ("category", 5)]
  assert [(x.name, x.vocab_size) for x in f.user_fields] == [("user_id", 5), ("activity", 10)]
  assert [(x.name, x.vocab_size) for x in f.context_fields] == [
      ("year", 4), ("month", 14), ("weekday", 9), ("gap", 10)]
  assert stats["num_users"] == 3 and stats["num_items"] == 6 and stats["num_categories"] == 3
  assert stats["num_samples"] == {"train": 2, "valid": 4, "test": 6}
  assert stats["protocol"] == "mian" and not stats["valid_is_test"]
  assert stats["reviews"] == {"lines": 13, "blank_lines": 0, "malformed_lines": 2,
                              "missing_fields": 1, "bad_time": 0, "parsed": 10,
                              "duplicate_reviews": 0, "without_metadata": 1, "kept": 9}
  assert stats["metadata"]["malformed_lines"] == 1
  assert stats["metadata"]["skipped_unreviewed"] == 1
  assert stats["metadata"]["items_found"] == 6
  assert stats["bad_row_ratio"]["reviews"] == pytest.approx(4 / 13)
  assert stats["checksum"] == schema_lib.dataset_checksum(str(tmp_path / "prepared"))


def _targets(split):
  """[(user id, item id, behaviours newest first)] of the positives of a split."""
  p = _positives(split)
  return [(u, i, tuple(h[:n])) for u, i, h, n in zip(
      p["user.user_id"], p["item.item_id"], p["hist.item_id"], p["hist_len"])]


def test_din_protocol_hand_worked(tmp_path):
  _, splits, stats = prepare(tmp_path, protocol="din", max_seq_len=30)
  # Test: review n-1; train: reviews 1..n-2 but for the validation users, ceil(1/10 of the
  # users with n >= 3) = 1 of uA, uB: seed 0 draws uA, whose review n-2 (i2) is valid.
  assert _targets(splits["train"]) == [(U["uA"], I["i3"], (I["i1"],)),
                                       (U["uB"], I["i5"], (I["i2"],))]
  assert _targets(splits["valid"]) == [(U["uA"], I["i2"], (I["i3"], I["i1"]))]
  test = _positives(splits["test"])
  np.testing.assert_array_equal(test["item.item_id"], [I["i4"], I["i1"], I["i6"]])
  np.testing.assert_array_equal(test["hist_len"], [3, 2, 1])
  # Published Electronics: train rows = 2 (reviews - 2 users), test rows = 2 users; here
  # the validation rows come out of train.
  assert (stats["num_samples"]["train"] + stats["num_samples"]["valid"]
          == 2 * (stats["num_reviews"] - 2 * stats["num_users"]))
  assert stats["num_samples"]["test"] == 2 * stats["num_users"] and not stats["valid_is_test"]


def test_dien_protocol_hand_worked(tmp_path):
  # seed 2: the first draw default_rng(2).integers(1, 11, size=3) = [9, 3, 2] sends only
  # uC (the third user) to test; of the others, ceil(2/10) = 1 is a validation user: uA.
  # Only each user's last review is a target.
  _, splits, stats = prepare(tmp_path, protocol="dien", max_seq_len=30, seed=2)
  dien_cat = dict(ITEM_CAT, i1="Fiction", i5="Art")  # last element of the FIRST path
  for split, rows in (("train", [("uB", "i1", ["i2", "i5"])]),
                      ("valid", [("uA", "i4", ["i1", "i3", "i2"])]),
                      ("test", [("uC", "i6", ["i3"])])):
    p = _positives(splits[split])
    assert len(splits[split]["label"]) == 2 * len(rows)
    for k, (user, target, hist) in enumerate(rows):
      assert p["user.user_id"][k] == U[user] and p["item.item_id"][k] == I[target]
      assert p["item.category"][k] == CAT[dien_cat[target]]
      n = p["hist_len"][k]
      assert list(p["hist.item_id"][k][:n]) == [I[h] for h in hist[::-1]]  # newest first
      assert list(p["hist.category"][k][:n]) == [CAT[dien_cat[h]] for h in hist[::-1]]
    negatives = splits[split]["item.item_id"][1::2]
    assert (negatives != p["item.item_id"]).all()  # only the target itself is excluded
    assert set(negatives) <= set(I.values())  # drawn from reviewed items
  assert stats["num_samples"] == {"train": 2, "valid": 2, "test": 2}
  assert not stats["valid_is_test"]


def test_dien_category_rule_is_first_path():
  assert amazon_raw.category_of([["Books", "Art"], ["Books", "Fiction"]], "dien") == "Art"
  assert amazon_raw.category_of([["Books", "Art"], ["Books", "Fiction"]], "din") == "Fiction"
  assert amazon_raw.category_of([], "din") is None
  assert amazon_raw.category_of([[]], "mian") is None


def test_metadata_fast_path_matches_literal_eval():
  wanted = {"i1": 0, "i2": 1, "i3": 2, "i4": 3, "i5": 4}
  lines = [
      "{'asin': 'zz', 'related': {'also_bought': ['asin']}, 'categories': [['A']]}",
      "{'asin': 'zz', 'asin': 'i2', 'categories': [['B']]}",  # the later key wins
      "{'asin': 'nope', 'description': 'chasing', 'categories': [['C']]}",  # fast path
      "{\"asin\": \"i1\", 'categories': [['D', \"E'F\"]]}",
      "{'asin': 'i3', 'categories': __import__('os').getcwd()}",  # never evaluated
      "{'asin': 'i3', 'categories': 'not a list'}",
      "{'asin': 'zz', 'as' 'in': 'i4', 'categories': [['G']]}",  # concatenated key
      "{'asin': 'zz', 'as\\x69n': 'i5', 'categories': [['H']]}",  # escaped key
  ]
  cats, counts = amazon_raw.parse_metadata(lines, wanted, "din")
  assert cats == ["E'F", "B", None, "G", "H"]
  assert counts["skipped_unreviewed"] == 2 and counts["malformed_lines"] == 1
  assert counts["missing_fields"] == 1
  # The same outcome as parsing every line with ast.literal_eval.
  for line in lines:
    try:
      obj = ast.literal_eval(line)
    except ValueError:
      continue
    if obj["asin"] in wanted and isinstance(obj["categories"], list):
      assert cats[wanted[obj["asin"]]] == obj["categories"][-1][-1]


def test_gzip_and_plain_files_give_identical_data(tmp_path):
  _, _, gz_stats = prepare(tmp_path / "gz", gz=True)
  _, _, plain_stats = prepare(tmp_path / "plain", gz=False)
  assert gz_stats["checksum"] == plain_stats["checksum"]
  assert plain_stats["raw_files"][0].endswith("reviews_Books_5.json")


def test_bad_row_ratio_fails_loudly(tmp_path):
  with pytest.raises(DataError, match="max_bad_row_ratio"):
    prepare(tmp_path, max_bad_row_ratio=0.1)
  assert not os.path.exists(tmp_path / "prepared")


def test_empty_and_missing_files(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "reviews_Books_5.json").write_text("")
  (raw / "meta_Books.json").write_text("")
  with pytest.raises(DataError, match="no usable review lines"):
    amazon.prepare(data_config(raw), str(tmp_path / "out"))
  with pytest.raises(DataError, match="not found"):
    amazon.prepare_from_files(data_config(raw), str(raw / "nope.json"),
                              str(raw / "meta_Books.json"), str(tmp_path / "out"))


def test_unknown_protocol_and_dataset():
  with pytest.raises(ValueError, match="protocol"):
    books.get_config("protocol=sasrec")
  with pytest.raises(ValueError, match="expected key=value"):
    electronics.get_config("dataset=books")
  with pytest.raises(ConfigError):
    amazon.raw_file_names("movies")
  assert electronics.get_config().data.dataset == "electronics"


# ------------------------------------------------------------------- randomized, reference checks


def write_random(directory, num_users=150, num_items=60, seed=1):
  """Random reviews (2-12 per user, with time ties) and metadata, plain text."""
  rng = np.random.default_rng(seed)
  reviews = []
  for u in range(num_users):
    n = rng.integers(2, 13)
    for i in rng.choice(num_items, size=n, replace=False):
      reviews.append((f"U{u:04d}", f"I{i:04d}", int(rng.integers(0, 60))))
  rng.shuffle(reviews)
  meta = [repr({"asin": f"I{i:04d}", "title": "it's",
                "categories": [["Books", f"c{i % 7}"], ["Books", f"d{i % 5}"]]})
          for i in range(num_items)]
  os.makedirs(directory, exist_ok=True)
  _write(os.path.join(directory, "reviews_Books_5.json"),
         [_review_line(*r) for r in reviews], gz=False)
  _write(os.path.join(directory, "meta_Books.json"), meta, gz=False)
  return reviews


def _reference_histories(reviews):
  """user -> list of (asin, day) sorted by time with file order breaking ties (plain Python)."""
  by_user = {}
  for user, asin, day in reviews:
    by_user.setdefault(user, []).append((asin, day))
  return {u: sorted(v, key=lambda x: x[1]) for u, v in by_user.items()}


@pytest.mark.parametrize("protocol", ["mian", "din", "dien"])
def test_random_data_matches_reference(tmp_path, protocol):
  reviews = write_random(tmp_path / "raw")
  t = 4
  out = str(tmp_path / "prepared")
  amazon.prepare(data_config(tmp_path / "raw", protocol=protocol, max_seq_len=t), out)
  histories = _reference_histories(reviews)
  users = sorted(histories)
  items = sorted({a for _, a, _ in reviews})
  seen = {s: set() for s in schema_lib.SPLITS}  # (user, item, day) of each target
  for split in schema_lib.SPLITS:
    cols = schema_lib.load_split(out, split)
    for k in range(0, len(cols["label"]), 2):
      user = users[cols["group_id"][k]]
      target = items[cols["item.item_id"][k] - 2]
      history = [a for a, _ in histories[user]]
      index = history.index(target)
      n = len(history)
      # No leakage: the behaviours are exactly the user's reviews before the target.
      expected = history[max(0, index - t):index][::-1]  # newest first
      assert [items[x - 2] for x in cols["hist.item_id"][k][:cols["hist_len"][k]]] == expected
      assert not cols["hist.item_id"][k][cols["hist_len"][k]:].any()
      negative = items[cols["item.item_id"][k + 1] - 2]
      if protocol == "dien":
        assert negative != target  # popularity negatives only exclude the target itself
      else:
        assert negative not in history  # never one of the user's positives
      # The review each split predicts: mian and din mirror the test one step earlier in time
      # (din for the validation users only); dien predicts every user's last review.
      allowed = {"mian": {"train": range(1, n - 2), "valid": [n - 2], "test": [n - 1]},
                 "din": {"train": range(1, n - 1), "valid": [n - 2], "test": [n - 1]},
                 "dien": {s: [n - 1] for s in schema_lib.SPLITS}}[protocol][split]
      assert index in allowed, (user, target, index, n, split)
      seen[split].add((user, target, histories[user][index][1]))
  # No target is in two splits.
  for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
    assert not seen[a] & seen[b], (a, b)
  users_of = {s: {u for u, _, _ in seen[s]} for s in schema_lib.SPLITS}
  num_positive = sum(len(v) - 1 for v in histories.values())
  if protocol in ("mian", "din"):
    assert sum(len(s) for s in seen.values()) == num_positive
    assert users_of["test"] == set(histories)
  if protocol == "din":  # ceil(1/10) of the users with >= 3 reviews validate, one target each
    eligible = sum(len(v) >= 3 for v in histories.values())
    assert len(seen["valid"]) == len(users_of["valid"]) == -(-eligible // 10) > 0
  if protocol == "dien":
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
      assert not users_of[a] & users_of[b]
    assert set().union(*users_of.values()) == set(histories)
    assert 0 < len(users_of["test"]) < 0.3 * len(histories)
    assert len(users_of["valid"]) == -(-(len(histories) - len(users_of["test"])) // 10)


def _split_digest(directory, split):
  """sha256 of a split's columns (names, dtypes, shapes and bytes), independent of .npy headers."""
  columns = schema_lib.load_split(directory, split)
  digest = hashlib.sha256()
  for name in sorted(columns):
    a = np.ascontiguousarray(columns[name])
    digest.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()[:16]


# The test splits of write_random's data (T = 4, seed 0) as prepared while din and dien still
# copied test into valid: holding a validation split out must not change them.
TEST_SPLIT_DIGESTS = {"din": "6f1f74a527c186b8", "dien": "8d269b773bd0f955"}


@pytest.mark.parametrize("protocol", ["din", "dien"])
def test_holding_out_validation_keeps_the_test_split(tmp_path, protocol):
  write_random(tmp_path / "raw")
  out = str(tmp_path / "prepared")
  amazon.prepare(data_config(tmp_path / "raw", protocol=protocol, max_seq_len=4), out)
  assert _split_digest(out, "test") == TEST_SPLIT_DIGESTS[protocol]
  assert _split_digest(out, "valid") != _split_digest(out, "test")
  assert not config_checks.valid_is_test(out)


def test_seeded_negatives_are_reproducible_and_seed_dependent(tmp_path):
  write_random(tmp_path / "raw")
  checksums = []
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    out = str(tmp_path / name)
    checksums.append(amazon.prepare_from_files(
        data_config(tmp_path / "raw", seed=seed), str(tmp_path / "raw/reviews_Books_5.json"),
        str(tmp_path / "raw/meta_Books.json"), out)["checksum"])
    assert checksums[-1] == schema_lib.dataset_checksum(out)
  assert checksums[0] == checksums[1] != checksums[2]


def test_ensure_prepared_downloads_from_base_url(tmp_path):
  source = write_tiny(tmp_path / "served")
  handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                 {"log_message": lambda *a: None})
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                          functools.partial(handler, directory=source))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    config = books.get_config()
    config.data.raw_dir = str(tmp_path / "raw")
    config.data.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    config.data.max_bad_row_ratio = 0.5
    config.data.max_seq_len = 3
    directory, schema = data_lib.ensure_prepared(config.data)
  finally:
    httpd.shutdown()
    httpd.server_close()
  assert sorted(os.listdir(tmp_path / "raw")) == ["meta_Books.json.gz", "reviews_Books_5.json.gz"]
  assert schema.size("test") == 6
  schema_lib.load_split(directory, "train", schema)


def test_offline_error_names_urls_and_paths(tmp_path):
  config = data_config(tmp_path / "nothing_here")
  config.base_url = "http://127.0.0.1:9/amazon/"  # discard port: connection refused
  with pytest.raises(DataError) as e:
    amazon.prepare(config, str(tmp_path / "out"))
  message = str(e.value)
  for name in amazon.raw_file_names("books"):
    assert config.base_url + name in message
    assert str(tmp_path / "nothing_here" / name) in message


def _reviews_of(users, items, num_items):
  users, items = np.asarray(users), np.asarray(items)
  count = np.bincount(users)
  start = np.concatenate([[0], np.cumsum(count)[:-1]])
  return amazon.Reviews(users, items, np.arange(len(users)), np.zeros(num_items, np.int64),
                        count, np.arange(len(users)) - start[users], len(count),
                        num_items, 1)


def test_negative_samplers_distributions():
  rng = np.random.default_rng(0)
  # User 0 reviewed items 0 and 1 of 4; user 1 reviewed item 0 eight times, item 3 once.
  reviews = _reviews_of([0, 0] + [1] * 9, [0, 1] + [0] * 8 + [3], num_items=4)
  rows = np.zeros(20000, np.int64)  # targets: row 0 (user 0, item 0)
  uniform = amazon.uniform_negatives(rng, reviews, rows)
  assert set(np.unique(uniform)) == {2, 3}  # never a positive of user 0
  assert abs((uniform == 2).mean() - 0.5) < 0.02
  popular = amazon.popularity_negatives(rng, reviews, rows)
  # Review rows hold item 0 nine times, item 1 once, item 3 once; item 0 is the target.
  assert set(np.unique(popular)) == {1, 3}
  assert abs((popular == 1).mean() - 0.5) < 0.02
  popular = amazon.popularity_negatives(rng, reviews, np.full(20000, 10))  # target item 3
  assert abs((popular == 0).mean() - 9 / 10) < 0.02  # popularity-weighted


# ------------------------------------------------------------------- bad input


def _review_at(user, asin, seconds):
  return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": seconds})


def _write_plain(directory, reviews, meta=META_LINES):
  """Plain raw files from lines (str, or bytes for undecodable text); returns the directory."""
  os.makedirs(directory, exist_ok=True)
  for name, lines in (("reviews_Books_5.json", reviews), ("meta_Books.json", meta)):
    with open(os.path.join(directory, name), "wb") as f:
      f.write(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
  return str(directory)


def _prepare_raw(raw, out, **kwargs):
  config = data_config(raw, **kwargs)
  return amazon.prepare_from_files(config, os.path.join(raw, "reviews_Books_5.json"),
                                   os.path.join(raw, "meta_Books.json"), str(out))


def _leaks(directory):
  """Positives whose target item is among their own behaviours."""
  leaks = 0
  for split in schema_lib.SPLITS:
    cols = schema_lib.load_split(directory, split)
    item, hist, n = (cols[k][0::2] for k in ("item.item_id", "hist.item_id", "hist_len"))
    leaks += sum(item[k] in hist[k][:n[k]] for k in range(len(item)))
  return leaks


def test_repeated_reviews_are_dropped_counted_and_cannot_leak_the_label(tmp_path):
  lines = [_review_line(*r) for r in GOOD_REVIEWS]
  clean = _prepare_raw(_write_plain(tmp_path / "clean", lines), tmp_path / "a", max_seq_len=4)
  # uA's test target i4 repeated, i1 repeated, and i1 reviewed again later (the earliest wins).
  repeated = lines + [lines[5], lines[0], _review_line("uA", "i1", 50)]
  raw = _write_plain(tmp_path / "repeated", repeated)
  stats = _prepare_raw(raw, tmp_path / "b", max_seq_len=4)
  assert stats["checksum"] == clean["checksum"]  # exactly the data without the repeats
  assert stats["reviews"]["duplicate_reviews"] == 3
  assert stats["reviews"]["kept"] == len(GOOD_REVIEWS)
  assert stats["first_skipped"]["reviews"]["duplicate_reviews"].startswith(
      "line 10: reviewer 'uA' reviewed asin 'i4' before")
  assert _leaks(str(tmp_path / "b")) == 0
  config = data_config(raw, max_seq_len=4)
  config.drop_duplicate_reviews = False  # the switch: keep them (the label then leaks)
  amazon.prepare_from_files(config, os.path.join(raw, "reviews_Books_5.json"),
                            os.path.join(raw, "meta_Books.json"), str(tmp_path / "c"))
  assert _leaks(str(tmp_path / "c")) > 0


@pytest.mark.parametrize("damage", ["truncated", "not_gzip"])
@pytest.mark.parametrize("which", [0, 1])
def test_damaged_gzip_files_are_one_line_errors(tmp_path, damage, which):
  raw = write_tiny(tmp_path / "raw", gz=True)
  path = os.path.join(raw, amazon.raw_file_names("books")[which])
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2] if damage == "truncated" else b"\x1f\x8b" + b"junk" * 50)
  with pytest.raises(DataError) as e:
    amazon.prepare(data_config(raw), str(tmp_path / "out"))
  message = str(e.value)
  assert path in message and "download it again" in message and "\n" not in message
  assert ("truncated" if damage == "truncated" else "not a valid gzip file") in message
  assert not os.path.exists(tmp_path / "out")


def test_implausible_review_times_are_skipped_and_reported(tmp_path):
  lines = [_review_line(*r) for r in GOOD_REVIEWS]
  clean = _prepare_raw(_write_plain(tmp_path / "clean", lines), tmp_path / "a")
  day = (BASE_DAY + 7) * DAY
  bad_times = [10**20, 2**62, -DAY, day * 1000]  # overflow, "year 146 billion", 1969, ms
  raw = _write_plain(tmp_path / "bad", lines + [_review_at("uA", "i5", t) for t in bad_times])
  stats = _prepare_raw(raw, tmp_path / "b", max_bad_row_ratio=0.5)
  assert stats["reviews"]["bad_time"] == 4
  assert stats["years"] == [2013, 2014]  # no new "years"
  assert stats["checksum"] == clean["checksum"]
  assert stats["first_skipped"]["reviews"]["bad_time"] == (
      f"line 10: unixReviewTime {10**20} is not Unix seconds in 1970..2099")
  # All times in milliseconds: an error that says so, naming the first line.
  raw = _write_plain(tmp_path / "ms", [_review_at(u, a, (BASE_DAY + d) * DAY * 1000)
                                       for u, a, d in GOOD_REVIEWS])
  with pytest.raises(DataError, match=r"line 1: unixReviewTime \d+ is not Unix seconds in "
                     r"1970..2099; it looks like milliseconds \(divide by 1000\)") as e:
    _prepare_raw(raw, tmp_path / "c")
  assert "\n" not in str(e.value)


def test_ids_that_differ_only_in_undecodable_bytes_stay_distinct(tmp_path):
  # Latin-1 bytes in a UTF-8 file: "U\xe9" and "U\xe8" are two users, "j\xe9" and "j\xe8"
  # two items with their own categories (with errors="replace" each pair read as one).
  undecodable = lambda text: text.encode().replace(b"<E9>", b"\xe9").replace(  # noqa: E731
      b"<E8>", b"\xe8")
  extra = [("U<E9>", "i1", 1), ("U<E9>", "j<E9>", 2), ("U<E9>", "i2", 3),
           ("U<E8>", "i3", 1), ("U<E8>", "j<E8>", 2), ("U<E8>", "i4", 3)]
  reviews = [_review_line(*r) for r in GOOD_REVIEWS] + [undecodable(_review_line(*r))
                                                        for r in extra]
  meta = META_LINES + [undecodable("{'asin': 'j<E9>', 'categories': [['Books', 'Poetry']]}"),
                       undecodable("{'asin': 'j<E8>', 'categories': [['Books', 'Drama']]}")]
  stats = _prepare_raw(_write_plain(tmp_path / "raw", reviews, meta), tmp_path / "out")
  assert (stats["num_users"], stats["num_items"], stats["num_categories"]) == (5, 8, 5)
  assert stats["metadata"]["items_found"] == 8
  assert stats["reviews"]["kept"] == len(GOOD_REVIEWS) + len(extra)


def test_prepare_cli_reports_a_truncated_download_in_one_line(tmp_path):
  raw = write_tiny(tmp_path / "raw", gz=True)
  path = os.path.join(raw, "reviews_Books_5.json.gz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-20])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, MIAN_JAX_CACHE=str(tmp_path / "cache"))
  out = subprocess.run([sys.executable, "-m", "mian_jax.prepare", "--config=configs/books.py",
                        f"--config.data.raw_dir={raw}"],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: amazon: {path} ends before its gzip stream does (a truncated download?); delete "
      "it and rerun to download it again, or replace it with a complete copy")


# ------------------------------------------------------------------- validation is never test


def _valid_copied_from_test(source, directory, stats=None):
  """A copy of the prepared `source` whose valid split is its test split (the references'
  layout), as another tool would write it: its stats.json says nothing unless `stats`."""
  schema = schema_lib.read_schema(source)
  splits = {s: dict(schema_lib.load_split(source, s, schema)) for s in schema_lib.SPLITS}
  splits["valid"] = splits["test"]
  sizes = dict(schema.num_examples, valid=schema.size("test"))
  schema = dataclasses.replace(schema,
                               num_examples=tuple((s, sizes[s]) for s in schema_lib.SPLITS))
  schema_lib.write_prepared(directory, schema, splits, stats)


def _prepared_config(directory):
  """Logistic regression for two steps on the prepared `directory` (T = 4)."""
  config = books.get_config("protocol=din,model=lr")
  config.data.source, config.data.prepared_dir, config.data.max_seq_len = "prepared", directory, 4
  config.model.embed_dim, config.train.num_train_steps, config.train.batch_size = 4, 2, 16
  config.train.eval_every_steps = config.checkpoint.every_steps = 2
  config.train.eval_every_epochs = 0.0  # validation by steps, not the Amazon configs' epochs
  config.eval.batch_size = 64
  return config


def test_selecting_on_a_validation_split_that_is_the_test_split_is_refused(tmp_path):
  write_random(tmp_path / "raw")
  held_out, copied = str(tmp_path / "held_out"), str(tmp_path / "copied")
  amazon.prepare(data_config(tmp_path / "raw", protocol="din", max_seq_len=4), held_out)
  _valid_copied_from_test(held_out, copied)
  assert config_checks.valid_is_test(copied) and not config_checks.valid_is_test(held_out)
  # The entry point (mian_jax.main runs exactly this) stops with one line, before training.
  with pytest.raises(SystemExit) as stopped:
    cli.run_or_exit(train.train_and_evaluate, _prepared_config(copied), str(tmp_path / "run"))
  message = str(stopped.value.code)
  assert message.startswith("error: the validation split is the test split in ") and (
      "config.eval.report_step='best' would select on test; set eval.report_step=last" in message)
  assert "\n" not in message and not (tmp_path / "run" / "checkpoints").exists()
  config = _prepared_config(copied)
  config.eval.report_step, config.train.early_stopping_patience = "last", 2
  with pytest.raises(ConfigError, match="early_stopping_patience=2 would select on test"):
    config_checks.check_validation_split(config, copied)
  config.train.early_stopping_patience = 0
  config_checks.check_validation_split(config, copied)  # nothing is chosen on valid
  config_checks.check_validation_split(_prepared_config(held_out), held_out)
  # A copy whose stats.json says so is refused without comparing files (valid is a subset).
  flagged = str(tmp_path / "flagged")
  _valid_copied_from_test(held_out, flagged, stats={"valid_is_test": True})
  assert config_checks.valid_is_test(flagged)


def _key_before_split_revisions(data_config):
  """settings_key as it was while din and dien copied test into valid."""
  settings = {k: v for k, v in data_config.to_dict().items() if k != "prepared_dir"}
  settings["format_version"] = schema_lib.FORMAT_VERSION
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def test_din_and_dien_caches_with_valid_copied_from_test_are_prepared_anew():
  for protocol in amazon.PROTOCOLS:
    for config in (books.get_config(f"protocol={protocol}").data,
                   amazon_like_config.get_config(f"protocol={protocol}").data):
      old = _key_before_split_revisions(config)
      assert (data_lib.settings_key(config) == old) == (protocol == "mian"), protocol


# ------------------------------------------------------------------- block reading = line reading


def _reference_parse_reviews(lines):
  """The line-by-line review parser that read_reviews replaced, kept as the reference."""
  from array import array  # noqa: PLC0415
  from mian_jax.data import timestamps  # noqa: PLC0415
  users, items = {}, {}
  u_ids, i_ids, times, line_of = array("q"), array("q"), array("q"), array("q")
  lines_total = blank = malformed = missing = bad_time = 0
  first = {}
  lo, hi = timestamps.MIN_SECONDS, timestamps.MAX_SECONDS
  for line in lines:
    lines_total += 1
    if not line.strip():
      blank += 1
      continue
    try:
      obj = json.loads(line)
      user, item, when = obj["reviewerID"], obj["asin"], obj["unixReviewTime"]
    except (ValueError, RecursionError):
      malformed += 1
      first.setdefault("malformed_lines", f"line {lines_total}: {line[:80]!r}")
      continue
    except (KeyError, TypeError):
      if isinstance(obj, dict):
        missing += 1
        first.setdefault("missing_fields", f"line {lines_total}: {line[:80]!r}")
      else:
        malformed += 1
        first.setdefault("malformed_lines", f"line {lines_total}: {line[:80]!r}")
      continue
    if (type(user) is not str or type(item) is not str or not user or not item  # noqa: E721
        or type(when) is not int):  # noqa: E721
      missing += 1
      first.setdefault("missing_fields", f"line {lines_total}: {line[:80]!r}")
      continue
    if not lo <= when < hi:
      bad_time += 1
      first.setdefault("bad_time", f"line {lines_total}: "
                       + timestamps.describe(when, "unixReviewTime"))
      continue
    u = users.setdefault(user, len(users))
    i = items.setdefault(item, len(items))
    u_ids.append(u)
    i_ids.append(i)
    times.append(when)
    line_of.append(lines_total)
  counts = {"lines": lines_total, "blank_lines": blank, "malformed_lines": malformed,
            "missing_fields": missing, "bad_time": bad_time, "parsed": len(u_ids)}
  as_array = lambda a: np.frombuffer(a, np.int64).copy()  # noqa: E731
  return amazon_raw.RawReviews(list(users), list(items), as_array(u_ids), as_array(i_ids),
                               as_array(times), counts, as_array(line_of), first)


def _reference_read_reviews(path):
  with gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
    return _reference_parse_reviews(f)


def _injected_review_lines(user, item, when):
  """Review lines (bytes, without the newline) of every kind that pyarrow and json.loads might
  read differently; user / item / when: a real reviewerID, asin and time."""
  good = lambda u=user, i=item, t=when: (  # noqa: E731
      f'{{"reviewerID": "{u}", "asin": "{i}", "unixReviewTime": {t}}}')
  return [x.encode() if isinstance(x, str) else x for x in [
      '{"reviewerID": "AX", "asin": ', "null", "[1, 2]", '"text"', "5", "{}", "",
      "   ", "\t", "\x0c", "\xa0",
      f'{{"asin": "{item}", "unixReviewTime": {when}}}',
      good(u=""), good(t=f"{when}.0"), good(t=f"{when}e0"), good(t=when * 1000), good(t=-86400),
      good(t=10**20), good(t="true"), good(t=f'"{when}"'),
      good() + " " + good(u="AY"),  # two objects on one line
      "\ufeff" + good(u="AZ"),  # byte order mark
      good(u="AW") + "\r",  # \r\n line end
      good(u="AV").encode().replace(b"AV", b"A\xe9V"),  # undecodable byte in the id
      good(u="A\\udc80"),  # lone surrogate escape
      good(u="A\\u00e9"),  # escaped non-ASCII
      f'{{"reviewerID": "AU", "\\u0061sin": "{item}", "unixReviewTime": {when}}}',
      good()[:-1] + ', "d": ' + "[" * 3000 + "]" * 3000 + "}",  # RecursionError in json
      good(u="AT")[:-1] + ', "d": ' + "[" * 300 + "]" * 300 + "}",  # deep, still JSON
      good()[:-1] + ', "overall": NaN}', good()[:-1] + ', "overall": 1e400}',
      good(u="AS", i="NO_SUCH_ASIN"),
      good(t=when + 86400),  # a repeated review (the earlier one is kept)
      good(u="AR", i=item, t=when), good(u="AR", i=item, t=when),  # a repeat, equal time
  ]]


def _damaged_amazon_like(tmp_path, seed=0):
  """A generated amazon_like raw pair with every kind of damaged review and metadata line
  inserted at seeded positions; returns (reviews path, metadata path)."""
  from configs import amazon_like as amazon_like_config  # noqa: PLC0415
  from mian_jax.data import amazon_like  # noqa: PLC0415
  g = amazon_like_config.get_generator("small")
  g.num_users, g.num_items, g.num_categories, g.max_reviews_per_user = 300, 150, 6, 40
  amazon_like.generate(g, str(tmp_path / "raw"))
  paths = amazon_like.raw_paths(str(tmp_path / "raw"), g.name)
  with gzip.open(paths["reviews"], "rb") as f:
    lines = f.read().split(b"\n")[:-1]
  first = json.loads(lines[0])
  rng = np.random.default_rng(seed)
  for line in _injected_review_lines(first["reviewerID"], first["asin"],
                                     first["unixReviewTime"]):
    lines.insert(int(rng.integers(1, len(lines))), line)
  with gzip.open(paths["reviews"], "wb") as f:
    f.write(b"\n".join(lines))  # no newline after the last line
  with gzip.open(paths["meta"], "rt", encoding="utf-8") as f:
    meta = f.read().splitlines()
  asin = [ast.literal_eval(x)["asin"] for x in meta[:6]]
  meta = [f"{{'asin': '{asin[0]}', 'flag': True, 'categories': [['A', 'B']]}}",
          f"{{'asin': '{asin[1]}', 'categories': (('A', 'C'),)}}",
          f"{{'asin': '{asin[2]}', 'title': \"Rock 'n' Roll\", 'categories': [['A', 'D']]}}",
          f"{{'asin': '{asin[3]}', 'categories': [[u'A', 'E']]}}",
          f"{{'asin': '{asin[4]}', 'categories': [['A', 'F'],]}}",
          f"{{'asin': '{asin[5]}', 'categories': [['A', 'G']], 'x': NaN}}",
          f"{{'asin': '{asin[5]}', 'categories': [['A', 'H']], 'x': 1e5, 'y': -0}}",
          "{'asin': 'zz', oops}"] + meta
  with gzip.open(paths["meta"], "wt", encoding="utf-8") as f:
    f.write("\n".join(meta) + "\n")
  return paths["reviews"], paths["meta"]


def test_block_reading_gives_the_line_by_line_result(tmp_path, monkeypatch):
  reviews_path, _ = _damaged_amazon_like(tmp_path)
  expected = _reference_read_reviews(reviews_path)
  monkeypatch.setattr(amazon_raw, "MIN_ARROW_LINES", 16)  # split rejected blocks down to 32 lines
  calls = []
  line_level = amazon_raw.review_of_line
  monkeypatch.setattr(amazon_raw, "review_of_line", lambda line: calls.append(1) or
                      line_level(line))
  for block_bytes in (1 << 14, 1 << 25):  # many blocks, one block
    calls.clear()
    monkeypatch.setattr(amazon_raw, "BLOCK_BYTES", block_bytes)
    got = amazon_raw.read_reviews(reviews_path)
    assert got.counts == expected.counts
    assert got.first_skipped == expected.first_skipped
    assert got.user_keys == expected.user_keys and got.item_keys == expected.item_keys
    for name in ("user", "item", "time", "line"):
      np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    assert len(calls) < expected.counts["lines"] / 4  # pyarrow read most lines
  c = expected.counts
  assert min(c["blank_lines"], c["malformed_lines"], c["missing_fields"], c["bad_time"]) >= 2
  assert "A\udce9V" in expected.user_keys and "A\udc80" in expected.user_keys


def test_prepared_data_is_identical_to_line_by_line_reading(tmp_path, monkeypatch):
  reviews_path, meta_path = _damaged_amazon_like(tmp_path)
  config = data_config(tmp_path / "raw", max_seq_len=4)
  prepared = {}
  with monkeypatch.context() as m:  # the replaced readers, and each split in one block
    m.setattr(amazon_raw, "read_reviews", _reference_read_reviews)
    m.setattr(amazon_raw, "_literal", amazon_raw._literal_eval_line)
    prepared["reference"] = amazon.prepare_from_files(config, reviews_path, meta_path,
                                                      str(tmp_path / "reference"))
  monkeypatch.setattr(amazon_raw, "BLOCK_BYTES", 1 << 14)
  monkeypatch.setattr(amazon, "EXAMPLE_BLOCK", 97)
  prepared["blocks"] = amazon.prepare_from_files(config, reviews_path, meta_path,
                                                 str(tmp_path / "blocks"))
  assert prepared["blocks"] == prepared["reference"]
  for split in schema_lib.SPLITS:
    assert _split_digest(tmp_path / "blocks", split) == _split_digest(tmp_path / "reference",
                                                                      split)
  stats = prepared["blocks"]
  assert stats["metadata"]["malformed_lines"] == 1  # NaN ('oops' is of an unreviewed asin)
  # Repeats: a day later, at equal times, and the lines with NaN and 1e400 in "overall".
  assert stats["reviews"]["duplicate_reviews"] == 4 and stats["reviews"]["without_metadata"] == 1
  assert stats["num_samples"]["train"] > 2 * amazon.EXAMPLE_BLOCK


def test_split_written_in_blocks_is_byte_identical_to_np_save(tmp_path):
  raw = write_tiny(tmp_path / "raw")
  amazon.prepare(data_config(raw), str(tmp_path / "whole"))
  schema = schema_lib.read_schema(str(tmp_path / "whole"))
  splits = {s: {k: np.asarray(v) for k, v in schema_lib.load_split(
      str(tmp_path / "whole"), s, schema).items()} for s in schema_lib.SPLITS}
  blocks = {s: [{k: v[lo:lo + 1] for k, v in splits[s].items()}
                for lo in range(schema.size(s))] for s in schema_lib.SPLITS}
  assert schema_lib.write_prepared(str(tmp_path / "a"), schema, splits) == (
      schema_lib.write_prepared(str(tmp_path / "b"), schema, blocks))
  short = dict(blocks, train=blocks["train"][:-1])
  with pytest.raises(DataError, match="rows were written"):
    schema_lib.write_prepared(str(tmp_path / "c"), schema, short)
  assert not os.path.exists(tmp_path / "c")


def test_long_reads_log_progress_lines(tmp_path, monkeypatch):
  from absl import logging as absl_logging  # noqa: PLC0415
  monkeypatch.setattr(amazon_raw, "PROGRESS_SECONDS", 0.0)
  monkeypatch.setattr(amazon_raw, "BLOCK_BYTES", 256)
  monkeypatch.setattr(amazon, "EXAMPLE_BLOCK", 2)
  lines = []
  monkeypatch.setattr(absl_logging, "info", lambda fmt, *args: lines.append(fmt % args))
  raw = write_tiny(tmp_path / "raw")
  amazon.prepare(data_config(raw), str(tmp_path / "out"))
  reading = [x for x in lines if x.startswith("amazon: reading reviews reviews_Books_5.json.gz:")]
  assert any(" lines (" in x and "/s), " in x and "ETA" in x for x in reading), lines
  assert any(x.startswith("amazon: reading metadata meta_Books.json.gz:") for x in lines)
  assert any(x.startswith("amazon: building train examples:") and "examples (" in x
             for x in lines)
  assert any("joining reviews with categories took" in x and "peak RSS" in x for x in lines)


def test_metadata_json_shortcut_matches_literal_eval():
  lines = ["{'asin': 'a', 'price': 1.5e2, 'rank': -0, 'c': [['A', 'B']], 'd': {'k': []}}",
           "{'asin': 'a', 'ok': True}", "{'asin': 'a', 'x': NaN}", "{'asin': 'a', 't': (1,)}",
           "{'asin': 'a', 'x': 1,}", "{'asin': 'a', 'x': 007}", "{'asin': 'a', 'x': +1}",
           "{'asin': 'a', 'x': .5}", "{'asin': 'a' 'b'}", "{'asin': 'a\tb'}", "{1: 'a'}",
           "{'asin': 'a', 'asin': 'b'}", "{'asin': \"it's\"}", "{'asin': 'a\\'b'}",
           "[" * 2000 + "]" * 2000, "{'asin': 'a', 'x': 1e400}", "{'a': 'b'} # c", ""]
  for line in lines:
    assert repr(amazon_raw._literal(line)) == repr(amazon_raw._literal_eval_line(line)), line


def test_extra_columns_in_groups_of_blocks_match_one_call(tmp_path, monkeypatch):
  write_random(tmp_path / "raw")
  calls = []

  def row_ids(reviews, rows, negatives):  # any per-row function of (row, negative)
    calls.append(len(rows))
    return {"extra.row": np.stack([rows, negatives], 1).reshape(-1).astype(np.float32)}

  config = data_config(tmp_path / "raw")
  paths = [str(tmp_path / "raw" / n) for n in ("reviews_Books_5.json", "meta_Books.json")]
  whole = amazon.prepare_from_files(config, *paths, str(tmp_path / "a"), extra_columns=row_ids)
  assert len(calls) == 3  # one call per split
  monkeypatch.setattr(amazon, "EXAMPLE_BLOCK", 7)
  monkeypatch.setattr(amazon, "EXTRA_BLOCK", 17)  # not a multiple of EXAMPLE_BLOCK
  calls.clear()
  blocks = amazon.prepare_from_files(config, *paths, str(tmp_path / "b"), extra_columns=row_ids)
  assert blocks["checksum"] == whole["checksum"]
  assert max(calls) <= 17 and len(calls) > 3
