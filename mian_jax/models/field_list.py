"""LR, Wide & Deep (Cheng et al. 2016), DCN (Wang et al. 2017), DeepFM (Guo et al. 2017), xDeepFM
(Lian et al. 2018), read as docs/baselines.md says. B batch, F = m fields, D embed_dim."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mian_jax.data.schema import FeatureSpec
from mian_jax.models import base, layers


class LR(nn.Module):
  """Logistic regression b + sum_f w_f(x_f) over all fields, behaviours' w by `sequence_pooling`."""
  features: FeatureSpec
  init_std: float
  sequence_pooling: layers.SequencePooling

  @nn.compact
  def __call__(self, batch, *, train: bool):
    del train  # no dropout
    logits, sq_norm = layers.LinearTerm(self.features, self.init_std, self.sequence_pooling,
                                        name="linear")(batch)
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": sq_norm}


class FieldListModel(base.DeepModel):
  """Over one field list [B, F, D] (`stack_fields`): logit = `LinearTerm` `linear_name` + `mlp`
  over the flattened fields, bias-free "deep_logit" + `interaction(fields)`; DCN has its own."""
  sequence_pooling: layers.SequencePooling
  linear_name = "linear"

  @nn.compact
  def __call__(self, batch, *, train: bool):
    linear, linear_sq = layers.LinearTerm(self.features, self.init_std, self.sequence_pooling,
                                          name=self.linear_name)(batch)
    e = self.embed(batch)
    fields = layers.stack_fields(e, self.sequence_pooling)
    h = self.mlp(layers.flatten_fields(fields), train=train)
    deep = nn.Dense(1, use_bias=False, kernel_init=self.kernel_init(), name="deep_logit")(h)
    logits = linear + deep[:, 0] + self.interaction(fields)
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": linear_sq + e.sq_norm}

  def interaction(self, fields: jax.Array) -> jax.Array | float:
    """The logit's third part, from the field embeddings [B, F, D]: [B], or 0."""
    return 0.0


class WideDeep(FieldListModel):
  """Eq. 3: P(y=1|x) = sigmoid(w_wide^T x + w_deep^T a^(l_f) + b), trained jointly; wide: the raw
  fields (`LinearTerm`, no cross-product transformations), deep: an MLP (eq. 1)."""
  linear_name = "wide"


class DCN(FieldListModel):
  """Embedding and stacking layer x_0 = [x_embed,1; ...; x_embed,F] [B, F * D] (eq. 1), a cross
  network (eq. 3, `layers.CrossNetwork`) beside a deep network (eq. 4), and the combination
  layer p = sigmoid(w_logit^T [x_L1; h_L2] + b_logit) (eq. 5)."""
  cross_layers: int

  @nn.compact
  def __call__(self, batch, *, train: bool):
    e = self.embed(batch)
    x0 = layers.flatten_fields(layers.stack_fields(e, self.sequence_pooling))
    cross = layers.CrossNetwork(self.cross_layers, self.kernel_init(), name="cross")(x0)
    logits = nn.Dense(1, kernel_init=self.kernel_init(), name="logit")(
        jnp.concatenate([cross, self.mlp(x0, train=train)], axis=-1))[:, 0]
    return logits.astype(jnp.float32), {"attention": {}, "embedding_sq_norm": e.sq_norm}


class DeepFM(FieldListModel):
  """y = sigmoid(y_FM + y_DNN) (eq. 1), y_FM = <w, x> + sum_{i<j} <V_i, V_j> x_i x_j (eq. 2),
  y_DNN an MLP over the same field embeddings V (eqs. 3-4)."""

  def interaction(self, fields: jax.Array) -> jax.Array:
    return layers.fm_second_order(fields)


class XDeepFM(FieldListModel):
  """y = sigmoid(w_linear^T a + w_dnn^T x_dnn + w_cin^T p+ + b) (eq. 11): a linear part, a DNN
  and a Compressed Interaction Network (`layers.CIN`), both over field embeddings X^0 [B, m, D]."""
  cin_layer_sizes: tuple[int, ...]

  def interaction(self, x0: jax.Array) -> jax.Array:
    p_plus = layers.CIN(self.cin_layer_sizes, self.kernel_init(), name="cin")(x0)
    return nn.Dense(1, use_bias=False, kernel_init=self.kernel_init(), name="cin_logit")(
        p_plus)[:, 0]
