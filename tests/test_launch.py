"""The ablation launcher's command building and summary (no training here)."""

import os
import sys

import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch"))
import ablations  # noqa: E402


def test_build_command_carries_seed_and_overrides():
  cmd = ablations.build_command("configs/synthetic.py", "/w", 3, ["--config.model.use_gim=False"])
  assert cmd[1:3] == ["-m", "mian_jax.main"]
  assert "--config.train.seed=3" in cmd and cmd[-1] == "--config.model.use_gim=False"


def test_summary_is_relative_to_the_first_variant_and_plots(tmp_path):
  frame = pd.DataFrame({
      "variant": ["mian", "mian", "w/o IBIM", "w/o IBIM"], "seed": [0, 1, 0, 1],
      "auc": [0.80, 0.82, 0.70, 0.72], "gauc": [0.7] * 4, "logloss": [0.5] * 4,
      "oracle_auc": [0.9] * 4})
  summary = ablations.summarise(frame)
  assert list(summary.index) == ["mian", "w/o IBIM"]
  assert summary.loc["w/o IBIM", "delta_auc"] == pytest.approx(-0.10)
  assert summary.loc["mian", "auc_std"] == pytest.approx(0.01414, abs=1e-4)
  ablations.plot(summary, str(tmp_path / "a.png"))
  assert (tmp_path / "a.png").stat().st_size > 1000


def test_every_registered_model_is_a_variant():
  from mian_jax.models import MODELS
  assert set(MODELS) <= set(ablations.VARIANTS)


def test_plot_without_an_oracle(tmp_path):
  frame = pd.DataFrame({"variant": ["mian", "lr"], "seed": [0, 0], "auc": [0.7, 0.6],
                        "gauc": [0.7, 0.6], "logloss": [0.6, 0.7], "oracle_auc": [None, None]})
  ablations.plot(ablations.summarise(frame), str(tmp_path / "b.png"))
  assert (tmp_path / "b.png").stat().st_size > 1000
