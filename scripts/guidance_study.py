"""How often a class model's samples are the class asked for, by guidance weight.

    python scripts/guidance_study.py --config mnist_cond --workdir /tmp/ddpm_mnist_cond \
        --guidance 0,3 --per_class 10 --out /tmp/guidance

Trains a small CNN classifier on the training split (Adam 1e-3, batch 128, --epochs),
reports its accuracy on the whole test split, then draws --per_class samples of each class
from the model's EMA weights at each guidance weight w and reports the fraction of each
class's samples that the classifier assigns to it. Writes OUT_w<w>.png (one row per class)
and prints one JSON line of results.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpm_jax import checkpointing, config_lib, fs, images, input_pipeline, sampling  # noqa: E402


class Classifier(nn.Module):
    """Two 3x3 conv + max-pool stages, then two dense layers: images in [-1, 1] -> logits."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in (32, 64):
            x = nn.max_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


def train_classifier(config, steps, batch_size=128, seed=0):
    """Parameters after `steps` Adam updates on (image, label) batches of the train split."""
    model, tx = Classifier(config.model.num_classes), optax.adam(1e-3)
    size, ch = config.data.image_size, config.data.num_channels
    params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, ch)))["params"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    batches = input_pipeline.train_iterator(config, batch_size, seed)
    for _ in range(steps):
        x, y = next(batches)
        params, opt_state = step(params, opt_state, x, y)
    return functools.partial(predict, model, params)


def predict(model, params, images):
    """Predicted classes of images in [-1, 1]."""
    return np.asarray(jnp.argmax(jax.jit(model.apply)({"params": params}, images), -1))


def test_accuracy(config, classify, batch_size=500):
    ds, _ = input_pipeline.eval_dataset(config, batch_size, split="test")
    right = total = 0
    for x, mask, _, y in ds.as_numpy_iterator():
        keep = mask > 0
        right += int(np.sum(classify(x)[keep] == y[keep]))
        total += int(keep.sum())
    return right / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="mnist_cond")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--guidance", default="0,3")
    parser.add_argument("--per_class", type=int, default=10)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--num_steps", type=int, default=0, help="0: the whole chain")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = config_lib.load_config(args.config)
    config.sampling.num_steps = args.num_steps
    num_train = 60_000 if config.data.dataset == "mnist" else 50_000
    classify = train_classifier(config, int(args.epochs * num_train / 128))
    result = dict(classifier_test_accuracy=test_accuracy(config, classify))
    params, step = checkpointing.restore_params(args.workdir, config)
    classes = config.model.num_classes
    labels = np.repeat(np.arange(classes), args.per_class)
    sample_fn = sampling.make_sample_fn(config_lib.build(config), progress=True)
    for w in map(float, args.guidance.split(",")):
        samples = sample_fn(params, jax.random.PRNGKey(0), len(labels), "float", labels, w)
        hits = classify(samples) == labels
        per_class = [float(hits[labels == c].mean()) for c in range(classes)]
        result[f"w={w:g}"] = dict(per_class=per_class, mean=float(hits.mean()))
        grid = images.image_grid(images.to_uint8(samples), ncols=args.per_class)
        fs.save_png(fs.as_path(f"{args.out}_w{w:g}.png"), grid)
    print(json.dumps(dict(result, step=step, num_steps=sample_fn.num_steps)))


if __name__ == "__main__":
    main()
