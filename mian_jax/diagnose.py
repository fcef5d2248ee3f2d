"""How cold are the evaluation splits, and how much AUC does bias alone reach? The library
of `python -m launch.diagnose_split`: `diagnose` builds the report, `to_markdown` formats it.

Per evaluation split: sizes, positive rate, the shares of cold users (no train example), cold
items (never a train candidate, or OOV), empty and short histories; AUC and gAUC of train-only
scores: item and user CTR (smoothed toward the train rate with SMOOTHING pseudo-impressions),
item popularity and "bias-only" = logit(item CTR) + logit(user CTR). With predictions files
(`python -m mian_jax.evaluate --predictions`, column `score`), the AUC and gAUC of each on the
warm / cold-user / cold-item subsets and history-length buckets, beside item CTR, bias-only and
the oracle where the data knows the click probability. The item is the first behaviour field.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from mian_jax import data as data_lib
from mian_jax import metrics, writers
from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError

SMOOTHING = 20.0  # pseudo-impressions at the train click rate added to every item / user CTR
SHORT_HISTORY = 5  # a history with fewer behaviours than this counts as short
EVAL_SPLITS = ("valid", "test")
BASELINES = ("item CTR", "user CTR", "item popularity", "bias-only (item + user logit)")
SUBSET_BASELINES = (BASELINES[0], BASELINES[-1])  # shown beside the predictions on each subset
SUBSETS = ("all", "warm user & warm item", "cold user", "cold item")
# Behaviour-history lengths [low, high) of the subsets that show where a model meets the
# oracle: a gap that shrinks with the history is information per user, not capacity.
HISTORY_BUCKETS = ((0, 1), (1, 5), (5, 15), (15, None))
ORACLE = "oracle (true click probability)"  # scored beside the models where the data knows it


def default_item_field(schema: schema_lib.Schema) -> str:
  """The field that identifies the candidate item: the first behaviour field, else item field."""
  f = schema.features
  return f.behavior_fields[0] if f.behavior_fields else f.item_fields[0].name


def load_columns(data_dir: str, schema: schema_lib.Schema, split: str,
                 item_field: str) -> dict[str, np.ndarray]:
  """{"user" [N] (group_id), "item" [N] (ids of `item_field`), "hist_len" [N], "label" [N]},
  and "click_prob" [N] where the data has it."""
  names = [x.name for x in schema.features.item_fields if x.is_categorical]
  if item_field not in names:
    raise DataError(f"--item_field={item_field!r} is not a categorical item field of "
                    f"{data_dir} (choose from {names})")
  columns = schema_lib.load_split(data_dir, split, schema)
  out = {"user": np.asarray(columns["group_id"]), "item": np.asarray(columns[f"item.{item_field}"]),
         "hist_len": np.asarray(columns["hist_len"]), "label": np.asarray(columns["label"])}
  if "extra.click_prob" in columns:  # generated data: the true click probability [N]
    out["click_prob"] = np.asarray(columns["extra.click_prob"], np.float64)
  return out


def cold_masks(train: dict[str, np.ndarray],
               split: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(cold user [N] bool, cold item [N] bool) of a split's examples: no train example; never a
  train candidate, or the OOV id (which stands for any number of items)."""
  cold_user = ~np.isin(split["user"], train["user"])
  known_items = train["item"][train["item"] != schema_lib.OOV_ID]
  cold_item = ~np.isin(split["item"], known_items)
  return cold_user, cold_item


def _train_totals(train_keys: np.ndarray, train_labels: np.ndarray,
                  keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(train impressions [N], train clicks [N]) of each key; 0 for a key absent from train."""
  unique, inverse = np.unique(train_keys, return_inverse=True)
  counts = np.bincount(inverse, minlength=unique.size).astype(np.float64)
  clicks = np.bincount(inverse, weights=train_labels, minlength=unique.size)
  index = np.clip(np.searchsorted(unique, keys), 0, max(unique.size - 1, 0))
  found = unique[index] == keys if unique.size else np.zeros(keys.shape, bool)
  return np.where(found, counts[index], 0.0), np.where(found, clicks[index], 0.0)


def smoothed_ctr(train_keys: np.ndarray, train_labels: np.ndarray, keys: np.ndarray,
                 smoothing: float = SMOOTHING) -> np.ndarray:
  """[N] train CTR of each of `keys`, (clicks + s * p) / (impressions + s) with s = `smoothing`
  and p the train click rate (p for a key absent from train); train_keys, train_labels [M]."""
  prior = float(np.mean(train_labels))
  counts, clicks = _train_totals(train_keys, train_labels, keys)
  return (clicks + smoothing * prior) / (counts + smoothing)


def _logit(p: np.ndarray) -> np.ndarray:
  p = np.clip(p, metrics.LOGLOSS_EPS, 1 - metrics.LOGLOSS_EPS)
  return np.log(p) - np.log1p(-p)


def baseline_scores(train: dict[str, np.ndarray], split: dict[str, np.ndarray],
                    smoothing: float = SMOOTHING) -> dict[str, np.ndarray]:
  """The train-only scores of BASELINES for a split's examples, each [N] float64."""
  labels = train["label"].astype(np.float64)
  item_ctr = smoothed_ctr(train["item"], labels, split["item"], smoothing)
  user_ctr = smoothed_ctr(train["user"], labels, split["user"], smoothing)
  popularity, _ = _train_totals(train["item"], labels, split["item"])
  return dict(zip(BASELINES, (item_ctr, user_ctr, popularity,
                              _logit(item_ctr) + _logit(user_ctr))))


def _mean(x: np.ndarray) -> float:
  """Mean of a [N] array (a share, for a bool mask); NaN when N = 0."""
  return float(np.mean(x)) if x.size else float("nan")


def split_summary(train: dict[str, np.ndarray], split: dict[str, np.ndarray],
                  smoothing: float = SMOOTHING) -> dict:
  """Sizes, cold shares, history shares and baseline AUC / gAUC of one evaluation split."""
  cold_user, cold_item = cold_masks(train, split)
  labels = split["label"]
  baselines = {name: {"auc": metrics.auc(labels, scores),
                      "gauc": metrics.gauc(labels, scores, split["user"])[0]}
               for name, scores in baseline_scores(train, split, smoothing).items()}
  return {"examples": int(labels.size), "positive_rate": _mean(labels),
          "users": int(np.unique(split["user"]).size),
          "items": int(np.unique(split["item"]).size),
          "cold_user_share": _mean(cold_user), "cold_item_share": _mean(cold_item),
          "empty_history_share": _mean(split["hist_len"] == 0),
          "short_history_share": _mean(split["hist_len"] < SHORT_HISTORY),
          "baselines": baselines}


def history_bucket_name(low: int, high: int | None) -> str:
  if high is None:
    return f"history >= {low}"
  return "empty history" if (low, high) == (0, 1) else f"history {low}-{high - 1}"


def subset_masks(cold_user: np.ndarray, cold_item: np.ndarray,
                 hist_len: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """SUBSETS name -> [N] bool mask (cold user and cold item overlap; warm/warm excludes both),
  then, given `hist_len` [N], one mask per HISTORY_BUCKETS entry."""
  masks = dict(zip(SUBSETS, (np.ones_like(cold_user), ~cold_user & ~cold_item, cold_user,
                             cold_item)))
  if hist_len is not None:
    for low, high in HISTORY_BUCKETS:
      upper = np.inf if high is None else high
      masks[history_bucket_name(low, high)] = (hist_len >= low) & (hist_len < upper)
  return masks


def parse_predictions_arg(values: list[str]) -> list[tuple[str, str]]:
  """["name=path" | "path", ...] -> [(name, path), ...]; a bare path is its own name."""
  parts = [value.partition("=") for value in values]
  return [(name, path) if sep else (name, name) for name, sep, path in parts]


def read_scores(path: str, split: dict[str, np.ndarray], split_name: str) -> np.ndarray:
  """The `score` column [N] of a predictions file; DataError if it is missing or unreadable, or
  not of this split (length, labels)."""
  import pyarrow.parquet as pq  # noqa: PLC0415 - only needed with --predictions
  if not os.path.isfile(path):
    raise DataError(f"predictions file not found: {path}")
  try:
    table = pq.read_table(path, columns=None)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None
  if "score" not in table.column_names:
    raise DataError(f"{path}: no 'score' column (columns: {table.column_names}); expected a "
                    "file written by `python -m mian_jax.evaluate --predictions`")
  n = split["label"].size
  if table.num_rows != n:
    raise DataError(f"{path} has {table.num_rows} rows but the {split_name} split has {n} "
                    "examples: predictions of another split or data set?")
  scores = table.column("score").to_numpy().astype(np.float64)
  if "label" in table.column_names and not np.array_equal(
      table.column("label").to_numpy(), split["label"]):
    raise DataError(f"{path}: its labels differ from the {split_name} split's, row by row: "
                    "predictions of another split or data set?")
  return scores


def predictions_summary(split: dict[str, np.ndarray], cold_user: np.ndarray,
                        cold_item: np.ndarray, scored: dict[str, np.ndarray]) -> dict:
  """Per subset: examples, positive rate, and the AUC and gAUC of each of `scored` (name -> [N]
  scores of the split's N examples)."""
  labels, users = split["label"], split["user"]
  result = {}
  for subset, mask in subset_masks(cold_user, cold_item, split["hist_len"]).items():
    result[subset] = {
        "examples": int(mask.sum()), "positive_rate": _mean(labels[mask]),
        "auc": {name: metrics.auc(labels[mask], s[mask]) for name, s in scored.items()},
        "gauc": {name: metrics.gauc(labels[mask], s[mask], users[mask])[0]
                 for name, s in scored.items()}}
  return result


def diagnose(data_dir: str, schema: schema_lib.Schema, predictions: list[tuple[str, str]] = (),
             predictions_split: str = "test", item_field: str | None = None,
             smoothing: float = SMOOTHING) -> dict:
  """The whole report as a JSON-able dict (NaN where an AUC is undefined)."""
  item_field = item_field or default_item_field(schema)
  columns = {s: load_columns(data_dir, schema, s, item_field) for s in ("train", *EVAL_SPLITS)}
  report = {"data_dir": data_dir, "source": schema.source, "item_field": item_field,
            "smoothing": smoothing, "short_history": SHORT_HISTORY,
            "train_examples": int(columns["train"]["label"].size),
            "splits": {s: split_summary(columns["train"], columns[s], smoothing)
                       for s in EVAL_SPLITS}}
  if predictions:
    names = [name for name, _ in predictions]
    if len(set(names)) != len(names) or set(names) & {*BASELINES, ORACLE}:
      raise DataError(f"predictions names {names} must be distinct and differ from "
                      f"{(*BASELINES, ORACLE)}")
    split = columns[predictions_split]
    scored = {name: read_scores(path, split, predictions_split) for name, path in predictions}
    cold_user, cold_item = cold_masks(columns["train"], split)
    baselines = baseline_scores(columns["train"], split, smoothing)
    beside = {name: baselines[name] for name in SUBSET_BASELINES}
    if "click_prob" in split:
      beside[ORACLE] = split["click_prob"]
    report["predictions"] = {
        "split": predictions_split, "files": dict(predictions),
        "subsets": predictions_summary(split, cold_user, cold_item, {**beside, **scored})}
  return report


markdown_table = functools.partial(writers.markdown_table, missing="n/a")


def to_markdown(report: dict) -> str:
  """The report as markdown tables."""
  splits = report["splits"]
  stats = (("examples", "examples"), ("positive rate", "positive_rate"),
           ("distinct users", "users"), ("distinct candidate items", "items"),
           ("cold-user share", "cold_user_share"), ("cold-item share", "cold_item_share"),
           ("empty-history share", "empty_history_share"),
           (f"history < {report['short_history']} share", "short_history_share"))
  parts = [f"Data: {report['data_dir']} ({report['source']}); {report['train_examples']} train "
           f"examples; item = item.{report['item_field']}.", "",
           markdown_table(["", *EVAL_SPLITS], [[label, *(splits[s][key] for s in EVAL_SPLITS)]
                                               for label, key in stats]),
           f"Scores fitted on train only (CTRs smoothed with {report['smoothing']:g} "
           "pseudo-impressions at the train click rate):", "",
           markdown_table(["score", *(f"{s} {m}" for s in EVAL_SPLITS for m in ("AUC", "gAUC"))],
                          [[name, *(splits[s]["baselines"][name][m] for s in EVAL_SPLITS
                                    for m in ("auc", "gauc"))] for name in BASELINES])]
  if "predictions" in report:
    p = report["predictions"]
    names = list(next(iter(p["subsets"].values()))["auc"])
    for metric in ("auc", "gauc"):
      parts += [f"{metric.replace('auc', 'AUC')} on subsets of the {p['split']} split:", "",
                markdown_table(["subset", "examples", "positive rate", *names],
                               [[subset, v["examples"], v["positive_rate"],
                                 *(v[metric][n] for n in names)]
                                for subset, v in p["subsets"].items()])]
  return "\n".join(parts)


def run(config, predictions: list[str], predictions_split: str, item_field: str | None,
        out: str | None) -> str:
  """Prepares the data if needed, diagnoses it, writes the outputs; returns the markdown."""
  data_dir, schema = data_lib.ensure_prepared(config.data)
  report = diagnose(data_dir, schema, parse_predictions_arg(predictions), predictions_split,
                    item_field)
  text = to_markdown(report)
  if out:
    writers.write_text_atomic(os.path.join(out, "diagnostics.md"), text)
    writers.write_json_atomic(os.path.join(out, "diagnostics.json"), report, warn=False)
  return text
