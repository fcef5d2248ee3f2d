"""Logistic regression and Wide & Deep (Cheng et al. 2016). Readings: docs/baselines.md.

Shapes: B batch, F fields (candidate item fields, one pooled field per behaviour field, user
and context fields), D embed_dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.data.schema import FeatureSpec
from mian_jax.models import base, layers


class LR(nn.Module):
  """Logistic regression over all fields: logit = b + sum_f w_f(x_f).

  A behaviour field contributes the `sequence_pooling` ("mean" or "sum" over valid behaviours)
  of its behaviours' weights. Returns (logits [B] float32, aux) like MIAN, with no attention.
  """
  features: FeatureSpec
  init_std: float = 0.02
  sequence_pooling: layers.SequencePooling = "mean"

  @nn.compact
  def __call__(self, batch, *, train: bool):
    del train  # no dropout
    logits, sq_norm = layers.LinearTerm(self.features, self.init_std, self.sequence_pooling,
                                        name="linear")(batch)
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": sq_norm}


class WideDeep(base.DeepModel):
  """Wide & Deep (Cheng et al. 2016, eq. 3), both parts trained jointly:

    P(y=1|x) = sigmoid(w_wide^T x + w_deep^T a^(l_f) + b),

  with the wide part the raw fields (`LinearTerm`, no hand-made cross-product transformations)
  and the deep part an MLP over the concatenated field embeddings (eq. 1).
  """
  sequence_pooling: layers.SequencePooling = "mean"

  @nn.compact
  def __call__(self, batch, *, train: bool):
    wide, wide_sq = layers.LinearTerm(self.features, self.init_std, self.sequence_pooling,
                                      name="wide")(batch)
    e = self.embed(batch)
    x = layers.stack_fields(e, self.sequence_pooling)                      # [B, F, D]
    deep = self.deep_logit(x, train=train)
    return ((wide + deep).astype(jnp.float32),
            {"attention": {}, "embedding_sq_norm": wide_sq + e.sq_norm})
