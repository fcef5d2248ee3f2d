"""Models by name. Each is a Flax module taking (features, **hyper-parameters from config.model)."""

from __future__ import annotations

import dataclasses
import typing

from ml_collections import ConfigDict

from mian_jax.data.schema import FeatureSpec
from mian_jax.errors import ConfigError, check_choice
from mian_jax.models.field_list import DCN, LR, DeepFM, WideDeep, XDeepFM
from mian_jax.models.interest import DIEN, DIN
from mian_jax.models.mian import MIAN

# MIAN and the paper's baselines (docs/baselines.md).
MODELS = {"mian": MIAN, "lr": LR, "wide_deep": WideDeep, "dcn": DCN, "deepfm": DeepFM,
          "xdeepfm": XDeepFM, "din": DIN, "dien": DIEN}


def literal_fields(cls) -> dict[str, tuple[str, ...]]:
  """Field -> allowed values, for each field of model class `cls` typed `Literal[...]`."""
  return {name: typing.get_args(hint) for name, hint in typing.get_type_hints(cls).items()
          if typing.get_origin(hint) is typing.Literal}


# "model.<field>" -> allowed values, declared once by the models' Literal-typed fields.
CHOICES = {f"model.{name}": allowed
           for cls in MODELS.values() for name, allowed in literal_fields(cls).items()}


def create_model(model_config: ConfigDict, features: FeatureSpec):
  """Builds `MODELS[model_config.name]` from the config keys its fields name."""
  check_choice("model.name", model_config.name, tuple(sorted(MODELS)))
  cls = MODELS[model_config.name]
  wanted = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name", "features"}
  if missing := sorted(k for k in wanted if k not in model_config):
    raise ConfigError(f"config.model lacks {missing}, needed by model {model_config.name!r}")
  kwargs = {k: tuple(v) if isinstance(v := model_config[k], list) else v for k in wanted}
  for name, allowed in literal_fields(cls).items():  # also for callers without config_checks
    check_choice(f"model.{name}", kwargs[name], allowed)
  return cls(features=features, **kwargs)
