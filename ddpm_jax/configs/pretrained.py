"""A diffusers pipeline folder or Hub id as a config: the network of its unet/config.json,
the diffusion of its scheduler, config.pretrained the folder its weights are read from.

    python sample.py --config pretrained:/path/to/ddpm-cifar10-32 --out /tmp/s
    python sample.py --pretrained google/ddpm-ema-church-256 --out /tmp/church   # the same

Settings can be overridden as for any config (--config.sampling.method=dpm++2m ...).
"""

from ddpm_jax import diffusers_pipeline


def get_config(name=None):
    if not name:
        raise ValueError(
            "the pretrained config takes a folder or Hub id: --config pretrained:FOLDER "
            "(or --pretrained FOLDER)"
        )
    return diffusers_pipeline.get_config(name)
