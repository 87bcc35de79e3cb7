"""The study encoder fine-tuned from scratch in a plain optax loop, outside the trainer.

  python docs/study_fashion/scratch_recipe/plain_loop.py N_TRAIN EPOCHS LR [MODEL_KWARGS [AUG]]

N_TRAIN: the first images of Fashion-MNIST's train split; scored on the first 2,000 test images.
AUG: 0 none, 1 shift (np.roll of the whole batch by up to 4 px) and flip, 2 shift, 3 flip.
Inputs are padded to 32 px and scaled by (x - 0.45) / 0.25, not the trainer's normalisation.
"""
import sys, time, numpy as np, jax, jax.numpy as jnp, optax, ml_collections
from eesmm_jax.models import swin
from eesmm_jax.data import idx
n_train, epochs, lr = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
kw = eval(sys.argv[4]) if len(sys.argv) > 4 else {}
aug = int(sys.argv[5]) if len(sys.argv) > 5 else 0
cfg = ml_collections.ConfigDict(dict(dataset="fashion_mnist", data_dir=None))
xtr, ytr = idx.published(cfg, "train"); xte, yte = idx.published(cfg, "test")
xtr, ytr = xtr[:n_train], ytr[:n_train]; xte, yte = xte[:2000], yte[:2000]
def prep(x):  # pad 28 -> 32, normalise, 3 channels
  x = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255.0
  x = (x - 0.45) / 0.25
  return np.repeat(x[..., None], 3, -1)
Xtr, Xte = prep(xtr), prep(xte)
model_kw = dict(img_size=32, patch_size=4, window_size=4, embed_dim=48, depths=(2, 2), num_heads=(3, 6), num_classes=10, drop_path_rate=0.1)
model_kw.update(kw)
model = swin.SwinTransformer(**model_kw)
params = jax.jit(model.init)(jax.random.PRNGKey(0), Xtr[:1])["params"]
print("params", sum(x.size for x in jax.tree_util.tree_leaves(params)))
B = 128; steps = int(epochs * n_train / B)
sched = optax.warmup_cosine_decay_schedule(0, lr, max(1, steps // 10), steps)
tx = optax.adamw(sched, weight_decay=0.05)
opt = tx.init(params)
@jax.jit
def step(params, opt, x, y, rng):
  def loss(p):
    lg = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
    return optax.softmax_cross_entropy(lg, optax.smooth_labels(jax.nn.one_hot(y, 10), 0.1)).mean()
  l, g = jax.value_and_grad(loss)(params)
  u, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, u), opt, l
@jax.jit
def pred(params, x): return jnp.argmax(model.apply({"params": params}, x), -1)
rng = np.random.default_rng(0); t = time.time()
for s in range(steps):
  i = rng.integers(0, n_train, B); x = Xtr[i]
  if aug:
    sh = rng.integers(-4, 5, (2,)) * (aug in (1, 2)); x = np.roll(x, tuple(sh), (1, 2))
    if aug in (1, 3) and rng.random() < .5: x = x[:, :, ::-1]
  params, opt, l = step(params, opt, x, ytr[i], jax.random.PRNGKey(s))
  if s % max(1, steps // 6) == 0 or s == steps - 1:
    acc = np.mean(np.concatenate([np.asarray(pred(params, Xte[j:j+500])) for j in range(0, 2000, 500)]) == yte)
    print(f"step {s}/{steps} loss {float(l):.3f} test {acc:.4f} {time.time()-t:.0f}s", flush=True)
