"""How cold are the evaluation splits, and how much AUC does bias alone reach?

  python -m launch.diagnose_split --config=configs/movielens.py \\
      [--predictions=mian=runs/a.parquet,din=runs/b.parquet] [--predictions_split=test] \\
      [--item_field=item_id] [--out=DIR] [--config.x=y ...]

Per evaluation split: sizes, positive rate, shares of cold users (no train example), cold items
(never a train candidate, or OOV), empty and short histories; AUC and gAUC of BASELINES, scores
fitted on train only. With predictions files (`python -m mian_jax.evaluate --predictions`), the
AUC and gAUC of each per SUBSETS and HISTORY_BUCKETS, beside SUBSET_BASELINES and the ORACLE.
Prints the report as markdown tables; with --out also writes `<out>/diagnostics.md` and
`<out>/diagnostics.json`.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pyarrow.parquet as pq
from absl import app, flags
from ml_collections import config_flags

from mian_jax import cli, encoding, metrics, writers
from mian_jax import data as data_lib
from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError

SMOOTHING = 20.0  # pseudo-impressions at the train click rate added to every item / user CTR
SHORT_HISTORY = 5  # a history with fewer behaviours than this counts as short
EVAL_SPLITS = ("valid", "test")
# Item and user CTR smoothed toward the train rate, and bias-only = logit(item + user CTR).
BASELINES = ("item CTR", "user CTR", "item popularity", "bias-only (item + user logit)")
SUBSET_BASELINES = (BASELINES[0], BASELINES[-1])  # shown beside the predictions on each subset
SUBSETS = ("all", "warm user & warm item", "cold user", "cold item")
# Behaviour-history lengths [low, high) of the subsets that show where a model meets the
# oracle: a gap that shrinks with the history is information per user, not capacity.
HISTORY_BUCKETS = {"empty history": (0, 1), "history 1-4": (1, 5), "history 5-14": (5, 15),
                   "history >= 15": (15, np.inf)}
ORACLE = "oracle (true click probability)"  # scored beside the models where the data knows it


def load_columns(data_dir: str, schema: schema_lib.Schema, split: str,
                 item_field: str) -> dict[str, np.ndarray]:
  """{"user" [N] (group_id), "item" [N] (ids of `item_field`), "hist_len" [N], "label" [N]},
  and "click_prob" [N] where the data has it."""
  columns = schema_lib.load_split(data_dir, split, schema)
  names = {"user": "group_id", "item": f"item.{item_field}", "hist_len": "hist_len",
           "label": "label", "click_prob": "extra.click_prob"}  # generated data: the true p
  return {key: np.asarray(columns[name], np.float64 if key == "click_prob" else None)
          for key, name in names.items() if name in columns}


def cold_masks(train: dict[str, np.ndarray],
               split: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(cold user [N] bool, cold item [N] bool) of a split's examples: no train example; never a
  train candidate, or the OOV id (which stands for any number of items)."""
  known_items = train["item"][train["item"] != encoding.OOV_ID]
  return ~np.isin(split["user"], train["user"]), ~np.isin(split["item"], known_items)


def _train_totals(train_keys: np.ndarray, train_labels: np.ndarray,
                  keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train impressions [N], train clicks [N]) of each key; 0 for a key absent from train."""
  unique, inverse = np.unique(np.concatenate([train_keys, keys]), return_inverse=True)
  train, split = inverse[:len(train_keys)], inverse[len(train_keys):]
  counts = np.bincount(train, minlength=unique.size).astype(np.float64)
  return counts[split], np.bincount(train, train_labels, minlength=unique.size)[split]


def smoothed_ctr(train_keys: np.ndarray, train_labels: np.ndarray, keys: np.ndarray,
                 smoothing: float = SMOOTHING) -> np.ndarray:
  """[N] train CTR of each of `keys`, (clicks + s * p) / (impressions + s) with s = `smoothing`
  and p the train click rate (p for a key absent from train); train_keys, train_labels [M]."""
  counts, clicks = _train_totals(train_keys, train_labels, keys)
  return (clicks + smoothing * float(np.mean(train_labels))) / (counts + smoothing)


def _logit(p: np.ndarray) -> np.ndarray:
  p = np.clip(p, metrics.LOGLOSS_EPS, 1 - metrics.LOGLOSS_EPS)
  return np.log(p) - np.log1p(-p)


def baseline_scores(train: dict[str, np.ndarray],
                    split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The train-only scores of BASELINES for a split's examples, each [N] float64."""
  labels = train["label"].astype(np.float64)
  item_ctr = smoothed_ctr(train["item"], labels, split["item"])
  user_ctr = smoothed_ctr(train["user"], labels, split["user"])
  popularity, _ = _train_totals(train["item"], labels, split["item"])
  return dict(zip(BASELINES, (item_ctr, user_ctr, popularity,
                              _logit(item_ctr) + _logit(user_ctr))))


def _mean(x: np.ndarray) -> float:
  """Mean of a [N] array (a share, for a bool mask); NaN when N = 0."""
  return float(np.mean(x)) if x.size else float("nan")


def split_summary(train: dict[str, np.ndarray], split: dict[str, np.ndarray]) -> dict:
  """Sizes, cold shares, history shares and baseline AUC / gAUC of one evaluation split."""
  cold_user, cold_item = cold_masks(train, split)
  labels = split["label"]
  baselines = {name: {"auc": metrics.auc(labels, scores),
                      "gauc": metrics.gauc(labels, scores, split["user"])[0]}
               for name, scores in baseline_scores(train, split).items()}
  return {"examples": int(labels.size), "positive_rate": _mean(labels),
          "users": int(np.unique(split["user"]).size),
          "items": int(np.unique(split["item"]).size),
          "cold_user_share": _mean(cold_user), "cold_item_share": _mean(cold_item),
          "empty_history_share": _mean(split["hist_len"] == 0),
          "short_history_share": _mean(split["hist_len"] < SHORT_HISTORY),
          "baselines": baselines}


def read_scores(path: str, split: dict[str, np.ndarray], split_name: str) -> np.ndarray:
  """The `score` column [N] of a predictions file; DataError if it is missing or unreadable, or
  not of this split (length, labels)."""
  if not os.path.isfile(path):
    raise DataError(f"predictions file not found: {path}")
  try:
    table = pq.read_table(path)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
  if "score" not in table.column_names:
    raise DataError(f"{path}: no 'score' column (columns: {table.column_names}); expected a "
                    "file written by `python -m mian_jax.evaluate --predictions`")
  if table.num_rows != split["label"].size:
    raise DataError(f"{path} has {table.num_rows} rows but the {split_name} split has "
                    f"{split['label'].size} examples: predictions of another split or data set?")
  if "label" in table.column_names and not np.array_equal(
      table.column("label").to_numpy(), split["label"]):
    raise DataError(f"{path}: its labels differ from the {split_name} split's, row by row: "
                    "predictions of another split or data set?")
  return table.column("score").to_numpy().astype(np.float64)


def predictions_summary(train: dict[str, np.ndarray], split: dict[str, np.ndarray],
                        scored: dict[str, np.ndarray]) -> dict:
  """Per subset of SUBSETS (cold user and cold item overlap; warm/warm excludes both) and
  HISTORY_BUCKETS: examples, positive rate, and the AUC and gAUC of each of `scored` (name ->
  [N] scores of the split's N examples)."""
  labels, users, hist_len = split["label"], split["user"], split["hist_len"]
  cold_user, cold_item = cold_masks(train, split)
  masks = dict(zip(SUBSETS, (np.ones_like(cold_user), ~cold_user & ~cold_item, cold_user,
                             cold_item)))
  masks.update({name: (hist_len >= low) & (hist_len < high)
                for name, (low, high) in HISTORY_BUCKETS.items()})
  return {subset: {
      "examples": int(mask.sum()), "positive_rate": _mean(labels[mask]),
      "auc": {name: metrics.auc(labels[mask], s[mask]) for name, s in scored.items()},
      "gauc": {name: metrics.gauc(labels[mask], s[mask], users[mask])[0]
               for name, s in scored.items()}} for subset, mask in masks.items()}


def diagnose(data_dir: str, schema: schema_lib.Schema, predictions: list[tuple[str, str]] = (),
             predictions_split: str = "test", item_field: str | None = None) -> dict:
  """The whole report as a JSON-able dict (NaN where an AUC is undefined)."""
  f = schema.features  # the candidate item: the first behaviour field, else the first item field
  item_field = item_field or (f.behavior_fields[0] if f.behavior_fields else f.item_fields[0].name)
  names = [x.name for x in f.item_fields if x.is_categorical]
  if item_field not in names:
    raise DataError(f"--item_field={item_field!r} is not a categorical item field of "
                    f"{data_dir} (choose from {names})")
  columns = {s: load_columns(data_dir, schema, s, item_field) for s in ("train", *EVAL_SPLITS)}
  train = columns["train"]
  report = {"data_dir": data_dir, "source": schema.source, "item_field": item_field,
            "smoothing": SMOOTHING, "short_history": SHORT_HISTORY,
            "train_examples": int(train["label"].size),
            "splits": {s: split_summary(train, columns[s]) for s in EVAL_SPLITS}}
  if predictions:
    names = [name for name, _ in predictions]
    if len(set(names)) != len(names) or set(names) & {*BASELINES, ORACLE}:
      raise DataError(f"predictions names {names} must be distinct and differ from "
                      f"{(*BASELINES, ORACLE)}")
    split = columns[predictions_split]
    baselines = baseline_scores(train, split)
    scored = {name: baselines[name] for name in SUBSET_BASELINES}
    if "click_prob" in split:
      scored[ORACLE] = split["click_prob"]
    scored.update({name: read_scores(path, split, predictions_split) for name, path in predictions})
    report["predictions"] = {"split": predictions_split, "files": dict(predictions),
                             "subsets": predictions_summary(train, split, scored)}
  return report


def to_markdown(report: dict) -> str:
  """The report as markdown tables."""
  table = functools.partial(writers.markdown_table, missing="n/a")
  splits = report["splits"]
  stats = (("examples", "examples"), ("positive rate", "positive_rate"),
           ("distinct users", "users"), ("distinct candidate items", "items"),
           ("cold-user share", "cold_user_share"), ("cold-item share", "cold_item_share"),
           ("empty-history share", "empty_history_share"),
           (f"history < {report['short_history']} share", "short_history_share"))
  parts = [f"Data: {report['data_dir']} ({report['source']}); {report['train_examples']} train "
           f"examples; item = item.{report['item_field']}.", "",
           table(["", *EVAL_SPLITS], [[label, *(splits[s][key] for s in EVAL_SPLITS)]
                                      for label, key in stats]),
           f"Scores fitted on train only (CTRs smoothed with {report['smoothing']:g} "
           "pseudo-impressions at the train click rate):", "",
           table(["score", *(f"{s} {m}" for s in EVAL_SPLITS for m in ("AUC", "gAUC"))],
                 [[name, *(splits[s]["baselines"][name][m] for s in EVAL_SPLITS
                           for m in ("auc", "gauc"))] for name in BASELINES])]
  if "predictions" in report:
    p = report["predictions"]
    names = list(next(iter(p["subsets"].values()))["auc"])
    for metric in ("auc", "gauc"):
      parts += [f"{metric.replace('auc', 'AUC')} on subsets of the {p['split']} split:", "",
                table(["subset", "examples", "positive rate", *names],
                      [[subset, v["examples"], v["positive_rate"], *(v[metric][n] for n in names)]
                       for subset, v in p["subsets"].items()])]
  return "\n".join(parts)


def run(flag) -> str:
  """Prepares the data if needed, diagnoses it, writes the outputs; returns the markdown."""
  data_dir, schema = data_lib.ensure_prepared(flag.config.data)
  parts = [value.partition("=") for value in flag.predictions]  # "name=path", or a path: its name
  report = diagnose(data_dir, schema, [(n, path if sep else n) for n, sep, path in parts],
                    flag.predictions_split, flag.item_field)
  text = to_markdown(report)
  if flag.out:
    writers.write_text_atomic(os.path.join(flag.out, "diagnostics.md"), text)
    writers.write_json_atomic(os.path.join(flag.out, "diagnostics.json"), report, warn=False)
  return text


def define_flags() -> None:
  flags.DEFINE_list("predictions", [], "Predictions Parquet files, `name=path` or `path`.")
  flags.DEFINE_enum("predictions_split", "test", list(EVAL_SPLITS),
                    "The split the predictions files score.")
  flags.DEFINE_string("item_field", None, "Item field that identifies the candidate item "
                      "(default: the first behaviour field).")
  flags.DEFINE_string("out", None, "Directory for diagnostics.md and diagnostics.json.")
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<dataset>.py[:arg]).",
                                  lock_config=True)
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(cli.run_or_exit(run, flags.FLAGS), end="")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
