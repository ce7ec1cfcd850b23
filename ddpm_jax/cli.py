"""What the entry points (ddpm_jax.train, .sample, .evaluate) share: their common flags
(--config by name or path, the compilation cache, multi-process settings), library chatter
off, and a user's mistake reported as one line instead of a traceback.

JAX's persistent compilation cache is on by default (`--compilation_cache`, default
$DDPM_COMPILATION_CACHE or ~/.cache/ddpm_jax/jax_cache; a local path or gs://; '' turns it
off), so a second launch of the same config and machine compiles nothing.

TensorFlow's C++ lines (its oneDNN notice at import, tf.data's notice that a cached dataset
was not read to its end, which every run shorter than an epoch ends with) are silenced by
quiet_tensorflow(), which each entry point calls before anything imports TensorFlow.
`--verbosity=1` (absl) shows the other libraries' Python log records again.
"""

import logging
import os
import sys
from pathlib import Path

import jax
from absl import app, flags

from ddpm_jax import config_lib, distributed
from ddpm_jax.errors import UserError, file_system_error

PACKAGE_DIR = str(Path(__file__).resolve().parent)
# Warnings that say nothing a user can act on.
HARMLESS = (
    "_CHECKPOINT_METADATA",  # orbax, reading a checkpoint written without it
    "has no dataset_info.json",  # TFDS, looking for a dataset that is not prepared yet
    "did not fully read the dataset being cached",  # tf.data, a bound on a few batches
)


def default_compilation_cache():
    default = Path("~/.cache/ddpm_jax/jax_cache").expanduser()
    return os.environ.get("DDPM_COMPILATION_CACHE", str(default))


def define_common_flags():
    """--config, --compilation_cache and the multi-process flags (distributed.py)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, f"A config's path, or a packaged one: {config_lib.config_names()}.",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_string(
        "compilation_cache", default_compilation_cache(),
        "JAX's persistent compilation cache (a directory, local or gs://); '' turns it off.",
    )  # fmt: skip
    distributed.define_flags()


def use_compilation_cache(directory):
    """Keep every compiled program in `directory` (None or '': off). JAX's own threshold of
    1 s of compile time is lowered to 0 unless set in the environment: a relaunch then
    compiles nothing, not even the small programs."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def setup(flag_values):
    """What every entry point does first: the compilation cache, then jax.distributed."""
    use_compilation_cache(flag_values.compilation_cache)
    distributed.initialize_from_flags()


def quiet_tensorflow():
    """TensorFlow's C++ INFO and warnings off, and its oneDNN kernels (whose notice is
    printed at import) unused: TensorFlow only reads data here. Settings already in the
    environment win."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class QuietLibraries(logging.Filter):
    """Keep every record of this project (the package and the entry point) and the other
    libraries' warnings and errors, less the HARMLESS ones, as one line each (without their
    tracebacks: an error that stops a run is reported once, at the end)."""

    def __init__(self, entry_point):
        super().__init__()
        self.ours = (PACKAGE_DIR, str(Path(entry_point).resolve()))

    def filter(self, record):
        if record.pathname.startswith(self.ours):
            return True
        message = record.getMessage()
        if record.levelno < logging.WARNING or any(text in message for text in HARMLESS):
            return False
        record.msg, record.args = (message.strip().splitlines() or [""])[0], None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def quiet_libraries(entry_point):
    """Install QuietLibraries on the root handlers (absl's among them)."""
    quiet = QuietLibraries(entry_point)
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)


def run(main, entry_point):
    """absl's app.run(main), with quiet libraries; a UserError or an error of the file
    system is one line (exit 1), Ctrl-C one line (exit 130)."""

    def wrapped(argv):
        verbose = flags.FLAGS.verbosity >= 1
        if not verbose:
            quiet_libraries(entry_point)
        try:
            return main(argv)
        except KeyboardInterrupt:
            if verbose:
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            line = str(e) if isinstance(e, UserError) else file_system_error(e)
            if verbose or line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 1

    try:
        argv = config_lib.resolve_config_flag(sys.argv)
        config_lib.check_config_flags(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    show_in_help(sys.modules[main.__module__])
    try:
        app.run(wrapped, argv=argv)
    except SystemExit as e:  # absl exits 1 after --help: asking for help is no failure
        asked = {"--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"} & set(argv)
        sys.exit(0 if asked and e.code == 1 else e.code)


def show_in_help(entry_module):
    """--help shows the entry module's docstring (its commands as they were started: `python
    sample.py`, or `ddpm-sample` for the installed command) and this project's flags and
    --verbosity, however it was started."""
    doc, program = entry_module.__doc__, Path(sys.argv[0]).name
    script = entry_module.__name__.rpartition(".")[2]
    if not program.endswith(".py"):  # an installed command, e.g. ddpm-sample
        doc = doc.replace(f"python {script}.py", program)
    sys.modules["__main__"].__doc__ = doc
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith(("ddpm_jax", "__main__")) or module == sys.argv[0]:
            for flag in module_flags:
                flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["verbosity"])
