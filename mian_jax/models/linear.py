"""Logistic regression and Wide & Deep (Cheng et al. 2016), read as docs/baselines.md says.
Shapes: B batch, F fields (item, one pooled per behaviour field, user, context), D embed_dim."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mian_jax.data.schema import FeatureSpec
from mian_jax.models import base, layers


class LR(nn.Module):
  """Logistic regression over all fields: logit = b + sum_f w_f(x_f), a behaviour field
  contributing the `sequence_pooling` of its behaviours' weights. Returns (logits [B], aux)."""
  features: FeatureSpec
  init_std: float
  sequence_pooling: layers.SequencePooling

  @nn.compact
  def __call__(self, batch, *, train: bool):
    del train  # no dropout
    logits, sq_norm = layers.LinearTerm(self.features, self.init_std, self.sequence_pooling,
                                        name="linear")(batch)
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": sq_norm}


class WideDeep(base.FieldListModel):
  """Wide & Deep (Cheng et al. 2016, eq. 3), both parts trained jointly:
  P(y=1|x) = sigmoid(w_wide^T x + w_deep^T a^(l_f) + b), the wide part the raw fields
  (`LinearTerm`, no cross-product transformations), the deep part an MLP (eq. 1)."""

  @nn.compact
  def __call__(self, batch, *, train: bool):
    wide, deep, _, sq_norm = self.linear_and_deep(batch, "wide", train=train)
    return (wide + deep).astype(jnp.float32), {"attention": {}, "embedding_sq_norm": sq_norm}
