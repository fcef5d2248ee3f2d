"""Vocabularies kept with the prepared data: for every source, the raw values of the prepared
rows, encoded with the saved maps and encoders, give back the prepared columns exactly; unseen
values are OOV and counted; the files are covered by the checksum; a directory prepared before
they were saved still loads and says so only when they are asked for."""

import datetime
import gzip
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from configs import amazon_like as amazon_like_config
from configs import books as books_config
from configs import movielens as movielens_config
from configs import synthetic as synthetic_config
from configs import tabular as tabular_config
from mian_jax import encoding
from mian_jax.data import amazon, amazon_like, movielens, synthetic, tabular, vocab
from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError

OOV = schema_lib.OOV_ID


def _load(directory):
  schema = schema_lib.read_schema(directory)
  splits = {s: {k: np.asarray(v) for k, v in schema_lib.load_split(directory, s, schema).items()}
            for s in schema_lib.SPLITS}
  return (schema, splits, vocab.load_vocabularies(directory), vocab.load_encoders(directory),
          vocab.load_lookups(directory))


def _categorical_fields(schema):
  f = schema.features
  return {f"{group}.{x.name}": x.vocab_size
          for group, fields in (("item", f.item_fields), ("user", f.user_fields),
                                ("context", f.context_fields)) for x in fields
          if x.is_categorical}


def _encode_field(vocabularies, encoders, field, raw):
  return encoding.encode_field(field, vocabularies.get(field), encoders.get(field), raw)


def _assert_encodes(vocabularies, encoders, field, raw, column, unseen=0):
  ids, count = _encode_field(vocabularies, encoders, field, raw)
  np.testing.assert_array_equal(ids, column, err_msg=field)
  assert count == unseen, field


def _history(vocabulary, raw_oldest_first, max_seq_len):
  """Ids of the last max_seq_len raw behaviours, newest first, padded with 0."""
  ids, _ = vocabulary.encode(raw_oldest_first[::-1][:max_seq_len])
  return np.pad(ids, (0, max_seq_len - len(ids)))


# ----------------------------------------------------------------------------- tabular

CSV = """user_id,ts,clicked,item_id,category,price,age_group,gender,city,hour,device
a,10,1,i1,c1,1.0,20,F,x,9,ios
a,20,0,i2,c2,3.0,20,F,x,10,ios
b,15,1,i2,c2,3.0,30,M,y,11,web
a,30,1,i3,c1,5.0,20,F,x,12,ios
b,40,1,i4,c3,7.0,30,M,y,13,web
a,50,0,i1,c1,1.0,20,F,,14,ios
"""


def _tabular_config(path, **overrides):
  config = tabular_config.get_config()
  config.data.max_seq_len = 2
  t = config.data.tabular
  t.path, t.valid_fraction, t.test_fraction = str(path), 0.2, 0.2
  for key, value in overrides.items():
    t[key] = value
  return config.data


def _prepare_tabular(tmp_path, text=CSV, **overrides):
  (tmp_path / "log.csv").write_text(text)
  directory = str(tmp_path / "prepared")
  tabular.prepare(_tabular_config(tmp_path / "log.csv", **overrides), directory)
  return directory


def test_tabular_raw_columns_encode_to_the_prepared_columns(tmp_path):
  directory = _prepare_tabular(tmp_path)
  schema, splits, vocabularies, encoders, lookups = _load(directory)
  assert lookups == {}
  assert {f: v.size for f, v in vocabularies.items()} == _categorical_fields(schema)
  log = pd.read_csv(tmp_path / "log.csv", dtype=str).sort_values("ts", key=lambda s: s.astype(int))
  # ts 10, 15, 20 = train; 30 = valid; 40, 50 = test (docs/data.md's worked example).
  rows = {"train": log[:3], "valid": log[3:4], "test": log[4:]}
  fields = [(g, name) for g in ("item", "user", "context")
            for name in tabular_config.get_config().data.tabular[f"{g}_fields"].split(",")]
  for g, spec in fields:
    name = spec.split(":")[0]
    column = f"{g}.{name}"
    _assert_encodes(vocabularies, encoders, column, rows["train"][name],
                    splits["train"][column])
  # Valid and test: i3 (valid) and i4 (test) were not seen in training; a@50 has no city.
  _assert_encodes(vocabularies, encoders, "item.item_id", rows["valid"]["item_id"], [OOV], 1)
  _assert_encodes(vocabularies, encoders, "item.item_id", rows["test"]["item_id"], [OOV, 2], 1)
  _assert_encodes(vocabularies, encoders, "user.city", rows["test"]["city"], [3, OOV], 1)
  _assert_encodes(vocabularies, encoders, "item.price", rows["test"]["price"],
                  splits["test"]["item.price"])
  # Behaviours of a@50, earlier clicks i1, i3 (oldest first): i3 is OOV.
  np.testing.assert_array_equal(_history(vocabularies["item.item_id"], ["i1", "i3"], 2),
                                splits["test"]["hist.item_id"][1])


@pytest.mark.parametrize("item_id", ["item_id", "item_id:hash(64)"])
def test_tabular_list_behaviours_encode_like_the_prepared_ones(tmp_path, item_id):
  text = "user_id,ts,clicked,item_id,category,hist\na,1,1,i1,c,\na,2,0,i2,c,i1\nb,3,1,i1,c,i2|i9\n"
  directory = _prepare_tabular(
      tmp_path, text, valid_fraction=0.0, test_fraction=0.0, item_fields=f"{item_id},category",
      user_fields="", context_fields="", behavior_fields="item_id", behavior_source="list",
      behavior_columns="item_id:hist")
  _, splits, vocabularies, _, _ = _load(directory)
  items = vocabularies["item.item_id"]
  if item_id == "item_id":
    assert items.values == ("i1", "i2", "i9")  # i9 occurs only as a behaviour
  else:
    assert isinstance(items, vocab.HashedVocabulary) and items.size == 66
  for row, raw in enumerate([[], ["i1"], ["i2", "i9"]]):
    np.testing.assert_array_equal(_history(items, raw, 2), splits["train"]["hist.item_id"][row])


# ----------------------------------------------------------------------------- MovieLens

H = 3600
GENRES = movielens.GENRES_100K
# user: age, gender, occupation, zip; movie: genre flags, release year (None = no date).
USERS = {1: (24, "M", "technician", "85711"), 2: (53, "F", "other", "94043"),
         3: (17, "M", "student", "T8H1N")}
MOVIES = {1: ((3, 4), 1995), 2: ((1, 2), 1987), 3: ((), None), 4: ((8,), 1996)}
# user, movie, rating, time; u1's m2 and m3 are simultaneous.
RATINGS = [(2, 4, 5, 60 * H), (1, 1, 5, 1 * H), (1, 2, 3, 2 * H), (1, 3, 4, 2 * H),
           (3, 4, 3, 80 * H), (2, 2, 4, 3 * H), (1, 4, 2, 50 * H), (2, 1, 1, 4 * H),
           (3, 1, 5, 5 * H), (2, 3, 4, 70 * H)]


def _write_movielens_100k(directory):
  os.makedirs(directory)
  flags = lambda on: "|".join("1" if i in on else "0" for i in range(len(GENRES)))  # noqa: E731
  files = {
      "u.data": ["\t".join(map(str, r)) for r in RATINGS],
      "u.user": [f"{u}|{a}|{g}|{o}|{z}" for u, (a, g, o, z) in USERS.items()],
      "u.item": [f"{m}|T|{f'01-Jan-{y}' if y else ''}||http://x|{flags(on)}"
                 for m, (on, y) in MOVIES.items()],
  }
  for name, lines in files.items():
    with open(os.path.join(directory, name), "w", encoding="latin-1") as f:
      f.write("\n".join(lines) + "\n")
  return str(directory)


def test_movielens_raw_values_encode_to_the_prepared_columns(tmp_path):
  config = movielens_config.get_config("100k")
  config.data.raw_dir = _write_movielens_100k(tmp_path / "raw")
  config.data.max_seq_len = 2
  config.data.movielens.valid_fraction = config.data.movielens.test_fraction = 0.2
  directory = str(tmp_path / "prepared")
  movielens.prepare(config.data, directory)
  schema, splits, vocabularies, encoders, lookups = _load(directory)
  assert {f: v.size for f, v in vocabularies.items()} == _categorical_fields(schema)
  # The lookups hold the raw files' values.
  users, movies = lookups["user.user_id"], lookups["item.movie_id"]
  assert users.get("user.age_group", [3, 1, 99]) == [17, 24, None]
  assert movies.get("item.genre", [1, 3]) == ["Animation", "unknown"]
  assert movies.get("item.release_year", [2, 3]) == [1987, None]

  # Prepared rows: by time, then user, then file order; 1..5 h train, 50 h valid, 70-80 h test.
  order = sorted(range(len(RATINGS)), key=lambda i: (RATINGS[i][3], RATINGS[i][0], i))
  cut = {"train": (0, 50 * H), "valid": (50 * H, 70 * H), "test": (70 * H, 1e9)}
  for split, (lo, hi) in cut.items():
    rows = [RATINGS[i] for i in order if lo <= RATINGS[i][3] < hi]
    user = [r[0] for r in rows]
    movie = [r[1] for r in rows]
    seconds = [r[3] for r in rows]
    earlier = [[t for u, _, _, t in RATINGS if u == r[0] and t < r[3]] for r in rows]
    raw = {
        "item.movie_id": movie,
        "item.genre": [GENRES[MOVIES[m][0][0]] if MOVIES[m][0] else "unknown" for m in movie],
        "item.release_year": [MOVIES[m][1] for m in movie],
        "user.user_id": user,
        "user.age_group": [USERS[u][0] for u in user],
        "user.gender": [USERS[u][1] for u in user],
        "user.occupation": [USERS[u][2] for u in user],
        "user.zip_prefix": [USERS[u][3] for u in user],
        "context.hour": seconds, "context.weekday": seconds, "context.month": seconds,
        "context.time_since_last": [r[3] - max(e) if e else None for r, e in zip(rows, earlier)],
    }
    for field, values in raw.items():
      column = splits[split][field]
      ids, unseen = _encode_field(vocabularies, encoders, field, values)
      np.testing.assert_array_equal(ids, column, err_msg=f"{split} {field}")
      assert unseen == np.count_nonzero(column == OOV)
      if split == "train":
        assert unseen == 0, field
    # Through the lookups, as a scorer given only (user, movie, time) would do it.
    for key, table, keys in (("item.movie_id", movies, movie), ("user.user_id", users, user)):
      for field in table.fields:
        ids, _ = _encode_field(vocabularies, encoders, field, table.get(field, keys))
        np.testing.assert_array_equal(ids, splits[split][field], err_msg=f"{key} -> {field}")
  assert encoding.apply_encoder(encoders["context.time_since_last"],
                            [None, 10, 2 * 86400, 40 * 86400]).tolist() == [
      "none", "lt_1h", "lt_1w", "ge_30d"]


# ----------------------------------------------------------------------------- Amazon

DAY = 86400
BASE_DAY = (datetime.date(2013, 12, 25) - datetime.date(1970, 1, 1)).days
ODD = b"u\xffD"  # a reviewerID with a byte that is not UTF-8
# (reviewer, asin, day offset), file order not time order.
REVIEWS = [(b"uA", "i1", 10), (b"uA", "i2", 12), (b"uA", "i3", 11), (b"uB", "i2", 5),
           (b"uB", "i5", 5), (b"uA", "i4", 40), (b"uB", "i1", 100), (ODD, "i3", 1),
           (ODD, "i6", 3), (ODD, "i1", 400), (ODD, "i2", 800)]
CATEGORY = {"i1": "Sci", "i2": "Fiction", "i3": "Sci", "i4": "Art", "i5": "Fiction", "i6": "Sci"}


def _write_amazon(directory):
  os.makedirs(directory)
  with gzip.open(os.path.join(directory, "reviews_Books_5.json.gz"), "wb") as f:
    for user, asin, day in REVIEWS:
      f.write(b'{"reviewerID": "' + user + b'", "asin": "' + asin.encode()
              + b'", "unixReviewTime": ' + str((BASE_DAY + day) * DAY).encode() + b"}\n")
  with gzip.open(os.path.join(directory, "meta_Books.json.gz"), "wt") as f:
    for asin, category in CATEGORY.items():
      f.write(repr({"asin": asin, "categories": [["Books", category]]}) + "\n")
  return str(directory)


def _amazon_examples():
  """Per split (protocol mian), the positive examples: (reviewer, asin, seconds, earlier
  asins oldest first, seconds of the previous review)."""
  by_user = {}
  for i, (user, asin, day) in enumerate(REVIEWS):
    by_user.setdefault(user.decode("utf-8", "surrogateescape"), []).append((day, i, asin))
  out = {"train": [], "valid": [], "test": []}
  for user in sorted(by_user):
    reviews = sorted(by_user[user])
    n = len(reviews)
    for pos in range(1, n):
      split = "train" if pos <= n - 3 else "valid" if pos == n - 2 else "test"
      day, _, asin = reviews[pos]
      out[split].append((user, asin, (BASE_DAY + day) * DAY, [a for _, _, a in reviews[:pos]],
                         (BASE_DAY + reviews[pos - 1][0]) * DAY))
  return out


def test_amazon_raw_values_encode_to_the_prepared_columns(tmp_path):
  config = books_config.get_config("protocol=mian").data
  config.raw_dir, config.max_seq_len = _write_amazon(tmp_path / "raw"), 2
  directory = str(tmp_path / "prepared")
  amazon.prepare(config, directory)
  schema, splits, vocabularies, encoders, lookups = _load(directory)
  sizes = _categorical_fields(schema)
  assert {f: v.size for f, v in vocabularies.items()} == {
      f: s for f, s in sizes.items() if f not in ("user.activity", "context.gap")}
  assert set(sizes) <= set(vocabularies) | set(encoders)
  assert "u\udcffD" in vocabularies["user.user_id"].ids  # survives the JSON round trip
  items, categories = lookups["item.item_id"], vocabularies["item.category"]
  for split, examples in _amazon_examples().items():
    p = {k: v[0::2] for k, v in splits[split].items()}  # positives; negatives at 1::2
    user, asin, seconds, earlier, previous = zip(*examples)
    raw = {
        "user.user_id": user, "item.item_id": asin,
        "item.category": items.get("item.category", asin),
        "user.activity": [len(e) for e in earlier],
        "context.gap": [(t - t0) // DAY for t, t0 in zip(seconds, previous)],
        "context.year": seconds, "context.month": seconds, "context.weekday": seconds,
    }
    for field, values in raw.items():
      _assert_encodes(vocabularies, encoders, field, values, p[field])
    for k, e in enumerate(earlier):
      np.testing.assert_array_equal(_history(vocabularies["item.item_id"], e, 2),
                                    p["hist.item_id"][k])
    # A negative's category is its asin's, through the lookup.
    negatives = [vocabularies["item.item_id"].values[i - 2]
                 for i in splits[split]["item.item_id"][1::2]]
    np.testing.assert_array_equal(categories.encode(items.get("item.category", negatives))[0],
                                  splits[split]["item.category"][1::2])
  assert items.get("item.category", ["i4", "nope"]) == ["Art", None]
  # The first review of a user has no previous one: its own bucket.
  assert _encode_field(vocabularies, encoders, "context.gap", [None, 0, 400])[0].tolist() \
      == [amazon.NO_PREVIOUS_GAP + 2, 2, 8]  # none, 0 days, 366+ days


def test_amazon_like_small_writes_every_map(tmp_path):
  config = amazon_like_config.get_config("size=small").data
  config.raw_dir = str(tmp_path / "raw")
  directory = str(tmp_path / "prepared")
  amazon_like.prepare(config, directory)
  schema = schema_lib.read_schema(directory)
  vocabularies = vocab.load_vocabularies(directory)
  assert set(vocabularies) == {"item.item_id", "item.category", "user.user_id", "context.year",
                               "context.month", "context.weekday"}
  sizes = _categorical_fields(schema)
  assert all(v.size == sizes[f] for f, v in vocabularies.items())
  items = vocab.load_lookups(directory)["item.item_id"]
  assert items.keys == vocabularies["item.item_id"].values


# ----------------------------------------------------------------------------- synthetic


def _synthetic_config():
  config = synthetic_config.get_config().data
  s = config.synthetic
  s.num_users, s.num_items, s.num_categories, s.num_occupations = 30, 20, 4, 5
  s.num_train, s.num_valid, s.num_test = 200, 50, 50
  s.min_seq_len, s.short_seq_len, s.recent_window = 2, 1, 3
  config.max_seq_len = 4
  return config


def test_synthetic_maps_are_identities_of_the_generator_indices(tmp_path):
  config = _synthetic_config()
  directory = str(tmp_path / "prepared")
  synthetic.prepare(config, directory)
  schema, splits, vocabularies, encoders, _ = _load(directory)
  sizes = _categorical_fields(schema)
  assert set(vocabularies) == set(sizes) and encoders == {}
  for field, v in vocabularies.items():
    assert v.values == tuple(str(k) for k in range(sizes[field] - 2))
  world = synthetic._World(config.synthetic, np.random.default_rng(config.synthetic.seed))
  train = splits["train"]
  users = train["group_id"]
  for field, raw in (("user.gender", world.gender[users]),
                     ("user.age_group", world.age_group[users]),
                     ("user.occupation", world.occupation[users]),
                     ("item.category", world.item_category[train["item.item_id"] - 2])):
    _assert_encodes(vocabularies, encoders, field, raw, train[field])


# ----------------------------------------------------------------------------- the files


def test_unseen_and_missing_values_are_oov_and_counted():
  v = vocab.Vocabulary("item.color", ("blue", "red"))
  ids, unseen = v.encode(["red", "green", None, float("nan"), "blue", pd.NA, np.nan])
  assert ids.tolist() == [3, OOV, OOV, OOV, 2, OOV, OOV] and unseen == 5
  assert v.size == 4 and v.ids == {"blue": 2, "red": 3}
  ids, unseen = v.encode([])
  assert ids.dtype == np.int32 and ids.shape == (0,) and unseen == 0


def test_vocabularies_are_covered_by_the_checksum(tmp_path):
  directory = _prepare_tabular(tmp_path)
  with open(os.path.join(directory, "stats.json")) as f:
    recorded = json.load(f)["checksum"]
  assert schema_lib.verify_dataset_checksum(directory) == recorded
  path = os.path.join(directory, "vocab", "item.item_id.json")
  with open(path) as f:
    content = json.load(f)
  content["values"] = content["values"][::-1]  # i1 <-> i2: the ids now mean other items
  with open(path, "w") as f:
    json.dump(content, f)
  with pytest.raises(DataError, match="changed after it was prepared"):
    schema_lib.verify_dataset_checksum(directory)
  os.remove(path)
  with pytest.raises(DataError, match="changed after it was prepared"):
    schema_lib.verify_dataset_checksum(directory)


def test_a_directory_prepared_before_vocabularies_loads_and_says_so_when_asked(tmp_path):
  source = str(tmp_path / "new")
  synthetic.prepare(_synthetic_config(), source)
  old = str(tmp_path / "old")
  shutil.copytree(source, old)
  shutil.rmtree(os.path.join(old, "vocab"))
  with open(os.path.join(old, "stats.json")) as f:
    stats = json.load(f)
  stats["checksum"] = schema_lib.dataset_checksum(old)  # as preparation recorded it then
  with open(os.path.join(old, "stats.json"), "w") as f:
    json.dump(stats, f)
  # Training reads it as before: checksum, schema, columns.
  assert schema_lib.verify_dataset_checksum(old) == stats["checksum"]
  assert stats["checksum"] != schema_lib.dataset_checksum(source)
  schema = schema_lib.read_schema(old)
  for split in schema_lib.SPLITS:
    schema_lib.load_split(old, split, schema)
  for load in (vocab.load_vocabularies, vocab.load_encoders, vocab.load_lookups):
    with pytest.raises(DataError) as e:
      load(old)
    assert str(e.value).startswith(f"{old} was prepared before vocabularies were saved; "
                                   "prepare it again")
    assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="not found"):
    vocab.load_vocabularies(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- hashed fields

# stable_hash pinned: these are `printf '<value>' | b2sum -l 64` read little-endian, so a change
# of the function (which would silently re-map every prepared directory) fails here.
GOLDEN_HASHES = {"i1": 778860755400141486, "café": 16417751708935026519,
                 "商品-42": 12796053187119561526, "😀": 8135518405970882805,
                 "u\udcffD": 12081805126920241231, "": 13020603013274838756}


def test_stable_hash_is_pinned_and_hash_ids_stay_in_range():
  assert {t: encoding.stable_hash(t) for t in GOLDEN_HASHES} == GOLDEN_HASHES
  values = ["i1", 7, None, float("nan"), "i1", "café", 7.0, pd.NA]
  ids, missing = vocab.HashedVocabulary("item.item_id", 10).encode(values)
  h = {t: 2 + encoding.stable_hash(t) % 10 for t in ("i1", "7", "café", "7.0")}  # str(value)
  assert ids.dtype == np.int32 and missing == 3
  assert ids.tolist() == [h["i1"], h["7"], OOV, OOV, h["i1"], h["café"], h["7.0"], OOV]
  many = encoding.hash_ids([f"v{k}" for k in range(5000)], 3)
  assert set(many.tolist()) == {2, 3, 4}


def test_hash_collisions_are_near_the_birthday_expectation():
  # n distinct values into N buckets: about n(n - 1) / (2N) colliding pairs (50 here, Poisson
  # standard deviation about 7); a hash that clumped would give many more.
  n, buckets = 10_000, 1_000_000
  ids = encoding.hash_ids([f"item-{k}" for k in range(n)], buckets)
  counts = np.bincount(ids)
  pairs = int((counts * (counts - 1) // 2).sum())
  expected = n * (n - 1) / (2 * buckets)
  print(f"{pairs} colliding pairs, {expected:.1f} expected")
  assert abs(pairs - expected) < 5 * np.sqrt(expected)


def test_tabular_hashed_raw_columns_encode_to_the_prepared_columns(tmp_path):
  directory = _prepare_tabular(tmp_path, item_fields="item_id:hash(1000),category,price:numeric",
                               user_fields="age_group,gender,city:hash(20)")
  schema, splits, vocabularies, encoders, _ = _load(directory)
  assert not os.path.exists(os.path.join(directory, "vocab", "item.item_id.json"))
  assert encoders["item.item_id"] == {"kind": "hash", "buckets": 1000, "first_id": 2,
                                      "function": "blake2b-8-le mod buckets",
                                      "of": "the value of item_id"}
  assert {f: v.size for f, v in vocabularies.items()} == _categorical_fields(schema)
  log = pd.read_csv(tmp_path / "log.csv", dtype=str).sort_values("ts", key=lambda s: s.astype(int))
  rows = {"train": log[:3], "valid": log[3:4], "test": log[4:]}
  for split, raw in rows.items():
    for field in ("item.item_id", "item.category", "user.city"):
      column = splits[split][field]
      ids, unseen = _encode_field(vocabularies, encoders, field, raw[field.split(".")[1]])
      np.testing.assert_array_equal(ids, column, err_msg=f"{split} {field}")
      assert unseen == np.count_nonzero(column == OOV)
  # i3 (valid) and i4 (test) were not seen in training: their own ids, none unseen; a@50's
  # missing city (hashed) is OOV and counted.
  assert OOV not in splits["valid"]["item.item_id"] and OOV not in splits["test"]["item.item_id"]
  _assert_encodes(vocabularies, encoders, "user.city", rows["test"]["city"],
                  splits["test"]["user.city"], unseen=1)
  assert splits["test"]["user.city"][1] == OOV
  _assert_encodes(vocabularies, encoders, "item.category", rows["valid"]["category"],
                  splits["valid"]["item.category"])
  # Behaviours (a@50: earlier clicks i1, i3) through the field's vocabulary, as predict does.
  np.testing.assert_array_equal(_history(vocabularies["item.item_id"], ["i1", "i3"], 2),
                                splits["test"]["hist.item_id"][1])


def test_a_hash_encoder_of_another_function_is_a_one_line_error(tmp_path):
  directory = _prepare_tabular(tmp_path, item_fields="item_id:hash(1000),category")
  encoders = vocab.load_encoders(directory)
  other = {**encoders["item.item_id"], "function": "xxh64 mod buckets"}
  with pytest.raises(DataError, match="hash function 'xxh64 mod buckets' is not the one this "
                     "version computes"):
    encoding.apply_encoder(other, ["i1"])
  path = os.path.join(directory, "vocab", "encoders.json")
  with open(path) as f:
    content = json.load(f)
  content["fields"]["item.item_id"]["buckets"] = 999  # no longer the schema's vocab_size
  with open(path, "w") as f:
    json.dump(content, f)
  with pytest.raises(DataError, match="item.item_id is hashed into 999 buckets from id 2, but "
                     "the schema's vocab_size is 1002"):
    vocab.load_vocabularies(directory)


def test_a_numeric_encoder_given_a_non_number_is_a_one_line_error():
  with pytest.raises(DataError, match="a 'calendar' encoder \\(s\\) is not a number"):
    encoding.apply_encoder({"kind": "calendar", "unit": "hour", "of": "s"}, ["noon"])
