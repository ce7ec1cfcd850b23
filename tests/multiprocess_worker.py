"""One process of the two-process test (multiprocess_test.py); not a test by itself.

python tests/multiprocess_worker.py COORDINATOR PROCESS_ID WORKDIR OUT.npz
"""

import os
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ddpm_jax import (  # noqa: E402
    bound,
    checkpointing,
    cli,
    config_lib,
    distributed,
    sampling,
    sharding,
    training,
)


def tiny_config():
    config = config_lib.load_config(ROOT / "configs" / "tiny.py")
    config.data.data_dir = os.environ["TFDS_DATA_DIR"]  # set by the test
    config.training.sample_every = 0
    return config


def global_batches(num=3, batch=8):
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (batch, 8, 8, 1)).astype(np.float32) for _ in range(num)]


def eval_bpd(params):
    """The bound on test[:12] (batches of 8: the second one padded)."""
    config = tiny_config()
    config.data.eval_split = "test[:12]"
    return bound.evaluate_bpd(config, config_lib.build(config), params, batch_size=8)["total_bpd"]


def main(coordinator, process_id, workdir, out):
    distributed.initialize(coordinator, 2, process_id, timeout_s=60)
    assert jax.process_count() == 2 and jax.device_count() == 4
    trainer = training.Trainer(tiny_config(), workdir)
    state = trainer.init()
    for batch in global_batches():
        half = batch.shape[0] // 2  # this process's rows of the global batch
        rows = batch[process_id * half : (process_id + 1) * half]
        state, _ = trainer.train_step(state, sharding.global_batch(rows, trainer.mesh))
    manager = checkpointing.make_manager(workdir)
    checkpointing.save(manager, state, tiny_config())
    manager.wait_until_finished()
    samples = sampling.make_sample_fn(tiny_config())(state.ema_params, jax.random.PRNGKey(0), 8)
    local = lambda a: np.asarray(a.addressable_data(0))  # replicated: every shard is whole
    params = {
        "/".join(map(str, k)): local(v)
        for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    bpd = eval_bpd(state.ema_params)  # each process reads its half of the split
    if process_id == 0:
        np.savez(out, samples=samples, total_bpd=bpd, **params)
    # The whole training loop across both processes (each reading its own data shard).
    loop_config = tiny_config()
    loop_config.training.update(num_steps=3, checkpoint_every=2, log_every=1)
    loop_config.eval.update(every=3, nll_batches=1, fid_samples=0)
    training.train_and_evaluate(loop_config, Path(workdir).parent / "loop")


if __name__ == "__main__":
    # Two fake devices per process; set here, not at import (the test imports this module).
    jax.config.update("jax_num_cpu_devices", 2)
    # The test session's persistent cache (conftest.py): the loop's train step and bound are
    # the programs this worker compiled already, and a second run of the test compiles none.
    cli.use_compilation_cache(os.environ.get("DDPM_COMPILATION_CACHE"))
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
