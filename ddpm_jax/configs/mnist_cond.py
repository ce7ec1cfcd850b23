"""Class-conditional MNIST with classifier-free guidance (Ho & Salimans 2022), on a CPU.

    python train.py --config mnist_cond --workdir /tmp/ddpm_mnist_cond
    python sample.py --config mnist_cond --workdir /tmp/ddpm_mnist_cond \
        --labels 0,1,2,3,4,5,6,7,8,9 --num_samples 8 --guidance 3 --out /tmp/digits

configs/mnist.py with a class embedding of the 10 digits added to the timestep embedding,
and the label replaced by "no label" for 10% of the training examples, so that one network
is both the conditional and the unconditional model that guidance combines. Grids during
training show the digits 0-9 in columns (at config.sampling.guidance).
"""

from ddpm_jax.configs import mnist


def get_config():
    config = mnist.get_config()
    config.model.num_classes = 10
    config.training.label_dropout = 0.1
    return config
