"""Benchmark of the Amazon preparation at Books scale: wall time, CPU time and peak RSS per stage.

Two sources of raw files in the Amazon 2014 format:

  synthetic    reviews_Books_5.json.gz and meta_Books.json.gz written here, with the real
               files' schema and roughly the real Books 5-core sizes at --scale=1 (~603k users,
               ~368k reviewed items, 1,600 categories, ~8.9M reviews; the metadata also holds ~5x
               as many unreviewed items, as meta_Books does);
  amazon_like  the files of `configs/amazon_like.py:size=<--size>` (generated into their cache
               directory if missing: minutes at size=books).

The preparation (configs/books.py's data settings, protocol --protocol) runs in a child process;
the result is its wall time and peak RSS, the per-stage lines it logged (wall s, CPU s, peak
RSS so far) as a table, the load average around it (the machine is shared), and one JSON line.

  python -m benchmarks.prepare_amazon --dir=/tmp/amazon_bench --scale=0.05
  python -m benchmarks.prepare_amazon --dir=/tmp/amazon_bench --source=amazon_like --size=books

Target at Books size: <= 60 s and <= 3 GB peak RSS on 2 cores (issue 22).
"""

from __future__ import annotations

import datetime
import functools
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import flags

from benchmarks import common

BOOKS_USERS = 603_668
BOOKS_ITEMS = 367_982
BOOKS_CATEGORIES = 1_600
MEAN_REVIEWS_PER_USER = 14.7  # 8.9M reviews / 603,668 users
CHUNK = 500_000


def _time_range() -> tuple[int, int]:
  start = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC).timestamp()
  end = datetime.datetime(2014, 7, 23, tzinfo=datetime.UTC).timestamp()
  return int(start) // 86400, int(end) // 86400


def generate(directory: str, scale: float, text_chars: int = 5, seed: int = 0) -> dict:
  """Writes the raw file pair; returns their sizes and counts.

  text_chars: length of each reviewText (the real Books texts average several hundred
  characters; short texts make the files small but underestimate the JSON parsing time).
  """
  rng = np.random.default_rng(seed)
  num_users = max(10, int(BOOKS_USERS * scale))
  num_items = max(10, int(BOOKS_ITEMS * scale))
  num_categories = min(BOOKS_CATEGORIES, max(5, int(BOOKS_CATEGORIES * scale ** 0.5)))
  # 5-core: at least 5 reviews per user, geometric tail with the real mean.
  per_user = 5 + rng.geometric(1.0 / (MEAN_REVIEWS_PER_USER - 4.0), size=num_users) - 1
  num_reviews = int(per_user.sum())
  popularity = 1.0 / (np.arange(num_items) + 20.0) ** 0.9
  popularity /= popularity.sum()
  # Unique, unsorted-looking names (the ids are ranks of the sorted names).
  user_names = [f"A{x:013X}" for x in (np.arange(num_users) * 2654435761 % (1 << 48)).tolist()]
  item_names = [f"{x:010d}" for x in (np.arange(num_items * 6) * 1000003 % 10 ** 10).tolist()]
  reviewed_items = item_names[:num_items]
  text = ("Fine. " * (text_chars // 6 + 1))[:text_chars]
  first_day, last_day = _time_range()
  os.makedirs(directory, exist_ok=True)
  reviews_path = os.path.join(directory, "reviews_Books_5.json.gz")
  users = np.repeat(np.arange(num_users), per_user)
  rng.shuffle(users)  # the real file is ordered by item; order must not matter
  with gzip.open(reviews_path, "wt", compresslevel=1, encoding="utf-8") as f:
    for lo in range(0, num_reviews, CHUNK):
      u = users[lo:lo + CHUNK]
      items = rng.choice(num_items, size=len(u), p=popularity)
      days = rng.integers(first_day, last_day, size=len(u))
      stars = rng.integers(1, 6, size=len(u))
      f.write("".join(
          f'{{"reviewerID": "{user_names[a]}", "asin": "{reviewed_items[b]}", '
          f'"reviewerName": "x", "helpful": [0, 0], "reviewText": "{text}", "overall": {c}.0, '
          f'"summary": "ok", "unixReviewTime": {d * 86400}, "reviewTime": "01 1, 2014"}}\n'
          for a, b, c, d in zip(u.tolist(), items.tolist(), stars.tolist(), days.tolist())))
  meta_path = os.path.join(directory, "meta_Books.json.gz")
  category = rng.integers(num_categories, size=len(item_names))
  order = rng.permutation(len(item_names))
  with gzip.open(meta_path, "wt", compresslevel=1, encoding="utf-8") as f:
    for lo in range(0, len(order), CHUNK):
      f.write("".join(
          repr({"asin": item_names[i], "title": "A 'quoted' title",
                "salesRank": {"Books": int(i)},
                "categories": [["Books", f"Genre {category[i] // 40}",
                                f"Category {category[i]}"]]}) + "\n"
          for i in order[lo:lo + CHUNK].tolist()))
  return {"scale": scale, "text_chars": text_chars, "users": num_users, "items": num_items,
          "categories": num_categories, "reviews": num_reviews,
          "reviews_gz_mb": round(os.path.getsize(reviews_path) / 2 ** 20, 1),
          "meta_gz_mb": round(os.path.getsize(meta_path) / 2 ** 20, 1),
          "meta_lines": len(item_names)}


def raw_pair(args) -> tuple[str, str]:
  """(reviews, metadata) paths of --source, generating the amazon_like files if missing."""
  if args.source == "synthetic":
    return (os.path.join(args.dir, "reviews_Books_5.json.gz"),
            os.path.join(args.dir, "meta_Books.json.gz"))
  from configs import amazon_like as amazon_like_config  # noqa: PLC0415
  from mian_jax.data import amazon_like  # noqa: PLC0415
  g = amazon_like_config.get_generator(args.size)
  raw_dir = amazon_like.default_raw_dir(g)
  paths = amazon_like.raw_paths(raw_dir, g.name)
  if not all(os.path.isfile(p) for p in paths.values()):
    amazon_like.generate(g, raw_dir)
  return paths["reviews"], paths["meta"]


def prepare_child(directory: str, protocol: str, reviews: str, meta: str) -> dict:
  """Runs the preparation in this process; returns wall time and peak RSS."""
  from absl import logging  # noqa: PLC0415 - the parent process needs none of these

  from configs import books  # noqa: PLC0415
  from mian_jax.data import amazon  # noqa: PLC0415
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  config = books.get_config(f"protocol={protocol}").data
  out = os.path.join(directory, f"prepared-{protocol}")
  shutil.rmtree(out, ignore_errors=True)
  started = time.time()
  amazon.prepare_from_files(config, reviews, meta, out)
  wall = time.time() - started
  with open(os.path.join(out, "stats.json")) as f:
    stats = json.load(f)
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"protocol": protocol, "wall_s": round(wall, 1), "cpu_s": round(time.process_time(), 1),
          "peak_rss_gb": round(peak_kb / 2 ** 20, 2),
          "num_users": stats["num_users"], "num_items": stats["num_items"],
          "num_categories": stats["num_categories"], "num_reviews": stats["num_reviews"],
          "num_samples": stats["num_samples"],
          "prepared_gb": round(sum(os.path.getsize(os.path.join(d, x))
                                   for d, _, xs in os.walk(out) for x in xs) / 2 ** 30, 2)}


# The stage lines of amazon.py / amazon_raw.py: "<stage> took 1.2s, CPU 1.0s (peak RSS so far
# 0.4 GB)" and "<stage>: 1,234 rows in 1.2s, CPU 1.0s (... peak RSS so far 0.4 GB)".
_STAGE = re.compile(r"amazon: (?P<stage>.+?)(?: took|: [\d,]+ \w+ in) (?P<wall>[\d.]+)s, "
                    r"CPU (?P<cpu>[\d.]+)s.*peak RSS so far (?P<rss>[\d.]+) GB")


def stage_table(log: str) -> str:
  """The child's stage lines as a Markdown table."""
  rows = [(m["stage"], m["wall"], m["cpu"], m["rss"]) for m in map(_STAGE.search,
                                                                   log.splitlines()) if m]
  lines = ["| stage | wall s | CPU s | peak RSS so far GB |", "|---|---:|---:|---:|"]
  return "\n".join(lines + [f"| {s} | {w} | {c} | {r} |" for s, w, c, r in rows])


def define_flags(fv: flags.FlagValues) -> None:
  string = functools.partial(flags.DEFINE_string, flag_values=fv)
  enum = functools.partial(flags.DEFINE_enum, flag_values=fv)
  string("dir", None, "where the raw files and output go")
  flags.mark_flag_as_required("dir", flag_values=fv)
  enum("source", "synthetic", ["synthetic", "amazon_like"], "where the raw files come from")
  string("size", "books", "amazon_like: configs/amazon_like.py size")
  flags.DEFINE_float("scale", 1.0, "synthetic: 1 = Books size", flag_values=fv)
  flags.DEFINE_integer("text_chars", 5, "synthetic: reviewText length", flag_values=fv)
  enum("protocol", "mian", ["mian", "din", "dien"], "the preparation protocol")
  flags.DEFINE_bool("skip_generate", False, "reuse the synthetic files", flag_values=fv)
  flags.DEFINE_multi_string("child", None, "internal: --child=REVIEWS --child=META prepares "
                            "those files in this process", flag_values=fv)


def main(argv=None):
  args = common.parse_flags(argv, __doc__, define_flags)
  if args.child:
    print("RESULT " + json.dumps(prepare_child(args.dir, args.protocol, *args.child)),
          flush=True)
    return
  generated = {}
  if args.source == "synthetic" and not args.skip_generate:
    started = time.time()
    generated = generate(args.dir, args.scale, args.text_chars)
    generated["generate_s"] = round(time.time() - started, 1)
    print("generated " + json.dumps(generated), flush=True)
  reviews, meta = raw_pair(args)
  os.makedirs(args.dir, exist_ok=True)
  load_before = os.getloadavg()[0]
  child = subprocess.run([sys.executable, "-m", "benchmarks.prepare_amazon",
                          "--dir", os.path.abspath(args.dir), "--protocol", args.protocol,
                          "--child", reviews, "--child", meta], cwd=common.ROOT,
                         capture_output=True, text=True, check=False)
  if child.returncode:
    sys.exit(f"the preparation failed:\n{child.stderr[-4000:]}")
  lines = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
  kept = ("meta_gz_mb", "generate_s", "text_chars")
  result = dict(json.loads(lines[-1][len("RESULT "):]), source=args.source,
                **({"size": args.size} if args.source == "amazon_like" else
                   {} if args.skip_generate else {"scale": args.scale}),
                load_average_before=round(load_before, 1),
                load_average_after=round(os.getloadavg()[0], 1), cores=os.cpu_count(),
                reviews_gz_mb=round(os.path.getsize(reviews) / 2 ** 20, 1),
                **{k: v for k, v in generated.items() if k in kept})
  print(stage_table(child.stderr))
  print(f"{'metric':<20} value")
  for key, value in result.items():
    print(f"{key:<20} {value}")
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
