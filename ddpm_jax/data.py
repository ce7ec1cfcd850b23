"""Datasets on disk: a TFDS dataset is prepared (downloaded and converted) once, on first
use by an entry point, or ahead of time with

    python -m ddpm_jax.data prepare mnist [--data_dir DIR]

DIR defaults to config.data.data_dir, then $TFDS_DATA_DIR, then ~/tensorflow_datasets.
Offline, or for datasets that need a manual download, it fails at once with one line
that says what to do. `folder:/path` datasets (a user's own images) need no preparation.
"""

import argparse
import difflib
import logging
import os
import socket
import sys
import urllib.parse

from ddpm_jax.errors import UserError

FOLDER_PREFIX = "folder:"
PROBE_TIMEOUT_S = 5.0


def prepare_command(name, data_dir="DIR"):
    return f"python -m ddpm_jax.data prepare {name} --data_dir {data_dir}"


def default_data_dir(data_dir=None):
    """Where TFDS reads: data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return (
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    )


def tensorflow_on_cpu_only():
    """TensorFlow only reads data here: keep it off the GPUs, whose memory it would
    otherwise take whole. Effective before TensorFlow first touches a device (every
    dataset is opened through here); later it changes nothing."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's devices are already set up
        pass


def builder(name, data_dir=None):
    """The TFDS builder of 'name[/config][:version]', or a UserError naming the closest
    dataset names (never the whole catalogue)."""
    import tensorflow_datasets as tfds  # here, so that main() quiets TensorFlow first

    tensorflow_on_cpu_only()
    try:
        return tfds.builder(name, data_dir=default_data_dir(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)  # offline: no GCS lookup
        close = difflib.get_close_matches(name.split("/")[0].split(":")[0], known)
        hint = f"; did you mean {', '.join(close[:3])}?" if close else "."
        raise UserError(
            f"dataset {name!r} (config.data.dataset) is not a TFDS dataset{hint} Or use "
            f"'{FOLDER_PREFIX}/path/to/images' for your own images."
        ) from None


def download_hosts(tfds_builder):
    """(host, port) pairs a builder downloads its source files from (its registered URLs)."""
    urls = [urllib.parse.urlparse(url) for url in tfds_builder.url_infos or {}]
    ports = {"http": 80, "https": 443, "ftp": 21}
    return sorted({(u.hostname, u.port or ports.get(u.scheme, 443)) for u in urls if u.hostname})


def reachable(host, port=443, timeout=PROBE_TIMEOUT_S):
    """Whether a TCP connection to host:port opens within `timeout` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_downloadable(tfds_builder):
    """Raise a one-line UserError if the builder cannot prepare itself from here."""
    name, root = tfds_builder.name, tfds_builder.data_dir_root
    if tfds_builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        raise UserError(
            f"dataset {name!r} is not prepared in {root} and needs a manual download: see "
            f"https://www.tensorflow.org/datasets/catalog/{name}, put the files in "
            f"{root}/downloads/manual, then run `{prepare_command(name, root)}`"
        )
    for host, port in download_hosts(tfds_builder):
        if not reachable(host, port):
            raise UserError(
                f"dataset {name!r} is not prepared in {root} and cannot be downloaded here "
                f"({host} is unreachable: offline?). On a machine with internet run "
                f"`{prepare_command(name)}`, copy DIR here and set TFDS_DATA_DIR=DIR "
                f"(or --config.data.data_dir=DIR)"
            )


def prepare(name, data_dir=None, log=print):
    """Download and prepare a TFDS dataset unless it already is; returns its builder."""
    tfds_builder = builder(name, data_dir)
    if tfds_builder.is_prepared():
        return tfds_builder
    check_downloadable(tfds_builder)
    size = tfds_builder.info.download_size
    log(
        f"Preparing {name!r} in {tfds_builder.data_dir_root} (first use only; "
        f"downloading {size or 'its files'})"
    )
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(try_download_gcs=False)
    tfds_builder.download_and_prepare(download_config=config)
    log(f"Prepared {name!r} in {tfds_builder.data_dir}")
    return tfds_builder


def ensure_prepared(config, log=print):
    """Prepare config.data.dataset if TFDS can download it. With several processes,
    process 0 prepares first (a shared data_dir is written once), then the others
    prepare theirs if they do not see it (a disk of their own)."""
    name = config.data.dataset
    if name.startswith(FOLDER_PREFIX):
        return
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        prepare(name, config.data.data_dir, log)
        return
    if jax.process_index() == 0:
        prepare(name, config.data.data_dir, log)
    multihost_utils.sync_global_devices("ddpm_jax.data.ensure_prepared")
    if jax.process_index() != 0:
        prepare(name, config.data.data_dir, log)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.data", description="Prepare a TFDS dataset once."
    )
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("name", help="a TFDS name, e.g. mnist or cifar10")
    parser.add_argument("--data_dir", help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    args = parser.parse_args(argv)
    try:
        prepared = prepare(args.name, args.data_dir)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"{args.name!r} is prepared in {prepared.data_dir}")


def quiet():
    """As quiet as the other entry points, before TensorFlow loads."""
    from ddpm_jax import cli

    cli.quiet_tensorflow()
    logging.basicConfig(format="%(levelname)s: %(message)s")  # the handler to quiet
    cli.quiet_libraries(__file__)


if __name__ == "__main__":
    quiet()
    main()
