"""MovieLens-100K and -1M from their raw files (docs/data.md): every rating is one example
(label: rating >= data.movielens.click_threshold), behaviours the user's strictly earlier
ratings, the splits a global time cut (`interaction_log.py`)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd
from ml_collections import ConfigDict

from mian_jax.data import interaction_log, timestamps, vocab
from mian_jax.data import records as records_lib
from mian_jax.errors import DataError

ENV_VAR = "MIAN_JAX_MOVIELENS_DIR"
URLS = {"100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip"}
FILES = {"100k": ("u.data", "u.user", "u.item"),
         "1m": ("ratings.dat", "users.dat", "movies.dat")}
# u.genre order of the 19 genre flags of u.item.
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # ML-1M codes: under 18, 18-24, ..., 56+
# time_since_last buckets: upper bounds in seconds (last bucket: longer).
GAP_BOUNDS = (3600, 86400, 7 * 86400, 30 * 86400)
GAP_NAMES = ("lt_1h", "lt_1d", "lt_1w", "lt_30d", "ge_30d")

# The fields of the log, all categorical, and those that form the behaviours.
FIELDS = {"item": ("movie_id", "genre", "release_year"),
          "user": ("user_id", "age_group", "gender", "occupation", "zip_prefix"),
          "context": ("hour", "weekday", "month", "time_since_last")}
BEHAVIOR = ("movie_id", "genre")


def raw_files(data_config: ConfigDict, download: bool = False) -> list[str]:
  """The variant's three raw files; DataError with instructions if missing (never downloaded)."""
  del download  # the user unzips the files (the error says from where)
  variant = data_config.movielens.variant
  if variant not in FILES:
    raise DataError(f"data.movielens.variant={variant!r}; expected one of {sorted(FILES)}")
  raw_dir = data_config.raw_dir or os.environ.get(ENV_VAR, "")
  hint = (f"download {URLS[variant]}, unzip it, and pass --config.data.raw_dir=<folder with "
          f"{', '.join(FILES[variant])}> or set {ENV_VAR}")
  if not raw_dir:
    raise DataError(f"MovieLens-{variant.upper()}: no raw data folder given; {hint}")
  raw_dir = os.path.expanduser(raw_dir)
  for candidate in (raw_dir, os.path.join(raw_dir, f"ml-{variant}")):
    paths = [os.path.join(candidate, f) for f in FILES[variant]]
    if all(map(os.path.isfile, paths)):
      return paths
  missing = [f for f in FILES[variant] if not os.path.isfile(os.path.join(raw_dir, f))]
  raise DataError(f"MovieLens-{variant.upper()}: {', '.join(missing)} not found in {raw_dir}; "
                  f"{hint}")


def _read_100k(paths: list[str], bad: interaction_log.BadRows):
  """(users, movies) of the 100K files u.user, u.item."""
  users = interaction_log.read_delimited(
      paths[1], "|", ("user", "age", "gender", "occupation", "zip"), bad)
  users = interaction_log.to_int(users, ("user", "age"), bad, "u.user")
  users["age_group"] = np.asarray(AGE_GROUPS)[  # raw age -> the ML-1M age-group code
      np.searchsorted(AGE_GROUPS[1:], users["age"].to_numpy(), side="right")]
  flags = [f"g{i}" for i in range(len(GENRES_100K))]
  movies = interaction_log.read_delimited(
      paths[2], "|", ("movie", "title", "release", "video", "url", *flags), bad)
  movies = interaction_log.to_int(movies, ("movie", *flags), bad, "u.item")
  flag_matrix = movies[flags].to_numpy(np.int64) > 0
  first = np.argmax(flag_matrix, axis=1)
  movies["genre"] = np.where(flag_matrix.any(axis=1), np.asarray(GENRES_100K, object)[first],
                             "unknown")
  movies["year"] = pd.to_numeric(movies["release"].str.strip().str[-4:], errors="coerce")
  return users, movies


def _read_1m(paths: list[str], bad: interaction_log.BadRows):
  """(users, movies) of the 1M files users.dat, movies.dat."""
  users = interaction_log.read_delimited(paths[1], "::",
                                         ("user", "gender", "age_group", "occupation", "zip"), bad)
  users = interaction_log.to_int(users, ("user", "age_group"), bad, "users.dat")
  movies = interaction_log.read_delimited(paths[2], "::", ("movie", "title", "genres"), bad)
  movies = interaction_log.to_int(movies, ("movie",), bad, "movies.dat")
  movies["genre"] = movies["genres"].str.split("|", n=1, regex=False).str[0].str.strip()
  movies["genre"] = movies["genre"].where(movies["genre"] != "", "unknown")
  movies["year"] = pd.to_numeric(movies["title"].str.extract(r"\((\d{4})\)\s*$")[0],
                                 errors="coerce")
  return users, movies


def read_log(data_config: ConfigDict, bad: interaction_log.BadRows) -> tuple[pd.DataFrame, dict]:
  """(log, lookups): one row per valid rating; each user's profile, movie's genre and year."""
  c = data_config.movielens
  paths = raw_files(data_config)
  ratings = interaction_log.read_delimited(paths[0], "\t" if c.variant == "100k" else "::",
                                           ("user", "movie", "rating", "timestamp"), bad)
  users, movies = (_read_100k if c.variant == "100k" else _read_1m)(paths, bad)
  r_name, u_name, m_name = FILES[c.variant]
  users = interaction_log.drop_duplicate_keys(users, "user", bad, u_name)
  movies = interaction_log.drop_duplicate_keys(movies, "movie", bad, m_name)
  ratings = interaction_log.to_int(ratings, ("user", "movie", "rating", "timestamp"), bad, r_name)
  lines = ratings["_line"].to_numpy()
  ok = np.ones(len(ratings), bool)
  for reason, good in (("rating outside 1..5", ratings["rating"].between(1, 5)),
                       ("unknown user", ratings["user"].isin(users["user"])),
                       ("unknown movie", ratings["movie"].isin(movies["movie"]))):
    bad.record(r_name, 0, ~good.to_numpy(), reason, lines)
    ok &= good.to_numpy()
  seconds = ratings["timestamp"].to_numpy()
  implausible = ok & ~timestamps.plausible(seconds)
  hints = np.array([timestamps.unit_hint(v) for v in seconds[implausible]], dtype=object)
  for hint in sorted(set(hints)):  # one reason per apparent unit (milliseconds, ...)
    mask = implausible.copy()
    mask[implausible] = hints == hint
    bad.record(r_name, 0, mask, f"timestamp is not {timestamps.RANGE_TEXT}{hint}", lines, seconds)
  ratings = ratings[ok & ~implausible].reset_index(drop=True)
  bad.check()
  for col in ("gender", "occupation", "zip"):
    users[col] = users[col].astype(str).str.strip()
  r = ratings.merge(users[["user", "age_group", "gender", "occupation", "zip"]], on="user",
                    how="left", validate="many_to_one")
  r = r.merge(movies[["movie", "genre", "year"]], on="movie", how="left", validate="many_to_one")
  seconds = r["timestamp"].to_numpy(np.float64)
  newest = interaction_log.history_indices(r, 1)[0][:, 0]  # the previous rating, -1: none
  gap = np.where(newest >= 0, seconds - seconds[newest], np.nan)
  year = (np.floor(r["year"] / 5) * 5).astype("Int64")  # 5-year spans, "1990-1994"
  when = pd.to_datetime(r["timestamp"], unit="s", utc=True)
  lookups = {
      "user.user_id": {
          "keys": users["user"].to_numpy(),
          # The raw age (100K, bucketed by the encoder) or the age-group code (1M).
          "user.age_group": users["age" if c.variant == "100k" else "age_group"].to_numpy(),
          "user.gender": users["gender"].to_numpy(),
          "user.occupation": users["occupation"].to_numpy(),
          "user.zip_prefix": users["zip"].to_numpy()},
      "item.movie_id": {
          "keys": movies["movie"].to_numpy(),
          "item.genre": movies["genre"].to_numpy(),
          "item.release_year": [None if np.isnan(y) else int(y) for y in movies["year"]]},
  }
  log = pd.DataFrame({
      "user": r["user"].to_numpy(),
      "timestamp": r["timestamp"].to_numpy(np.int64),
      "label": (r["rating"] >= c.click_threshold).to_numpy(np.float32),
      "split": interaction_log.time_split(r["timestamp"].to_numpy(), c.valid_fraction,
                                          c.test_fraction),
      "item.movie_id": r["movie"].to_numpy(),
      "item.genre": r["genre"].to_numpy(),
      "item.release_year": (year.astype(str) + "-" + (year + 4).astype(str)).where(
          r["year"].notna(), "unknown").to_numpy(object),
      "user.user_id": r["user"].to_numpy(),
      "user.age_group": r["age_group"].to_numpy(),
      "user.gender": r["gender"].to_numpy(),
      "user.occupation": r["occupation"].to_numpy(),
      "user.zip_prefix": r["zip"].str[:c.zip_prefix_len].to_numpy(),
      "context.hour": when.dt.hour.to_numpy(),
      "context.weekday": when.dt.day_of_week.to_numpy(),
      "context.month": when.dt.month.to_numpy(),
      "context.time_since_last": np.where(np.isnan(gap), "none", np.asarray(GAP_NAMES, object)[
          np.searchsorted(GAP_BOUNDS, np.nan_to_num(gap), side="right")]),
  })
  return log, lookups


def encoders(data_config: ConfigDict) -> dict[str, dict]:
  """How the derived fields come from raw quantities (vocab.py's encoders)."""
  c = data_config.movielens
  out = {
      "item.genre": {"kind": "rule", "of": "the movie's genres",
                     "rule": "the first listed genre (100K: first flag in u.genre order; 1M: "
                             "first of the list); 'unknown' if none"},
      "item.release_year": {"kind": "year_span", "width": 5, "missing": "unknown",
                            "of": "the release year (100K: of the release date; 1M: the "
                                  "'(year)' ending the title)"},
      "user.zip_prefix": {"kind": "prefix", "length": c.zip_prefix_len, "of": "the zip code"},
      **{f"context.{unit}": {"kind": "calendar", "unit": unit,
                             "of": "the rating's Unix timestamp (seconds)"}
         for unit in ("hour", "weekday", "month")},
      "context.time_since_last": {
          "kind": "buckets", "edges": list(GAP_BOUNDS), "names": list(GAP_NAMES),
          "missing": "none",
          "of": "seconds since the user's previous (strictly earlier) rating"},
  }
  if c.variant == "100k":
    out["user.age_group"] = {"kind": "buckets", "edges": list(AGE_GROUPS[1:]),
                             "names": [str(a) for a in AGE_GROUPS], "of": "the age in years"}
  return out


def generate(data_config: ConfigDict):
  """(schema, {split: columns}, stats, write_vocabularies for `schema.write_prepared`)."""
  c = data_config.movielens
  bad = interaction_log.BadRows(data_config.max_bad_row_ratio)
  log, lookups = read_log(data_config, bad)
  source = (f"movielens-{c.variant}(click=rating>={c.click_threshold}, global time split "
            f"valid={c.valid_fraction}, test={c.test_fraction})")
  schema, splits, info = interaction_log.build_examples(
      log, {g: [(name, "categorical") for name in names] for g, names in FIELDS.items()},
      BEHAVIOR, data_config.max_seq_len, source)
  span = log.groupby("split")["timestamp"].agg(["min", "max"])
  stats = {
      "source": f"movielens-{c.variant}",
      "protocol": (f"label = rating >= {c.click_threshold}; global time split: last "
                   f"{c.test_fraction:.0%} of ratings by timestamp = test, the "
                   f"{c.valid_fraction:.0%} before = valid, rest = train; behaviours = the "
                   f"user's strictly earlier ratings, last {data_config.max_seq_len}; "
                   "vocabularies from train only"),
      "num_ratings": len(log),
      "num_users": int(log["user"].nunique()),
      "num_items": int(log["item.movie_id"].nunique()),
      "num_categories": int(log["item.genre"].nunique()),
      "vocab_sizes": info["vocab_sizes"],
      "time_range": {("train", "valid", "test")[i]: [int(lo), int(hi)]
                     for i, lo, hi in span.itertuples()},
      "bad_rows": bad.summary(),
  }
  write_vocabularies = functools.partial(
      vocab.write_vocabularies, vocabularies=info["vocabularies"], encoders=encoders(data_config),
      lookups=lookups, note=(f"movielens-{c.variant}: user_id and movie_id are the ids of the "
                             "raw files; the lookups give each user's profile and each movie's "
                             "genre and release year as read from them"))
  return schema, splits, stats, write_vocabularies


def predict_reader(data_config: ConfigDict) -> ConfigDict:
  """How predict reads rating records (`records.read_records`); the label is optional."""
  del data_config  # the same columns for 100K and 1M
  return records_lib.reader_config(user_id="user", item_id="movie", timestamp="timestamp")


def encode_records(records: records_lib.Records, directory: str,
                   data_config: ConfigDict) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Rating records -> (split columns, unseen values per field): a labelled row (all, without a
  label column) is a rating, an unlabelled one a candidate; profiles etc. from vocab/'s lookups."""
  log = records.log
  lookups = vocab.load_lookups(directory)
  users, movies = log["user"].to_numpy(object), log["item.movie"].to_numpy(object)
  seconds = log["timestamp"].to_numpy(np.float64)
  rated = log["label"].notna().to_numpy() if records.labelled else np.ones(len(log), bool)
  indices, hist_len = interaction_log.history_indices(log, data_config.max_seq_len, rated)
  newest = indices[:, 0]  # the latest strictly earlier rating, -1 if none
  raw = {"item.movie_id": movies, "user.user_id": users,
         "context.time_since_last": np.where(newest >= 0, seconds - seconds[newest], np.nan)}
  for key, values in (("item.movie_id", movies), ("user.user_id", users)):
    raw.update({field: lookups[key].get(field, values) for field in lookups[key].fields})
  raw.update({f"context.{unit}": seconds for unit in ("hour", "weekday", "month")})
  return records_lib.encode(records, directory, raw, BEHAVIOR, indices, hist_len)


def prepare(data_config: ConfigDict, directory: str) -> None:
  """Reads the raw MovieLens files and writes the prepared data (atomically) to `directory`."""
  interaction_log.write_with_stats(directory, *generate(data_config))
