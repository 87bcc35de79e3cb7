"""Linear probe: a frozen encoder's pooled features, then a linear softmax classifier.

Cheap enough to run after every pretraining: features are extracted once, and the classifier is
full-batch AdamW on standardised features in one jitted `lax.scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def extract_features(encoder, params, batches) -> tuple[np.ndarray, np.ndarray]:
  """Pooled features [N, C] and labels [N] of every real (unpadded) example in `batches`."""
  apply = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
  feats, labels = [], []
  for batch in batches:
    keep = batch.get("mask", np.ones(len(batch["label"]), bool)).astype(bool)
    feats.append(np.asarray(apply(params, batch["image"]))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(feats), np.concatenate(labels)


def fit_linear_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, steps: int = 500,
                          learning_rate: float = 0.05, weight_decay: float = 1e-3):
  """-> (predict_fn, train_accuracy). Features are standardised with the training statistics."""
  mean, std = x.mean(0), x.std(0) + 1e-6
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  w = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
  xs, ys = jnp.asarray((x - mean) / std), jnp.asarray(y)

  def loss(w):
    logits = xs @ w["kernel"] + w["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

  def step(carry, _):
    w, opt = carry
    grads = jax.grad(loss)(w)
    updates, opt = tx.update(grads, opt, w)
    return (optax.apply_updates(w, updates), opt), None

  (w, _), _ = jax.jit(lambda w: jax.lax.scan(step, (w, tx.init(w)), None, length=steps))(w)
  predict = lambda f: np.asarray(jnp.argmax(((f - mean) / std) @ w["kernel"] + w["bias"], -1))
  return predict, float((predict(x) == y).mean())


def linear_probe_accuracy(train_xy, test_xy, num_classes: int) -> float:
  predict, _ = fit_linear_classifier(*train_xy, num_classes)
  x, y = test_xy
  return float((predict(x) == y).mean())
