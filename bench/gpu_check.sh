#!/usr/bin/env bash
# The GPU check of a change, in as few device minutes as possible: the benches of the
# CIFAR10 network (train step at batch 128, forward and sampler at 256, float32 and
# bfloat16, each against the GPU's own conv peak measured in the same run), then the test
# suite. Each part's output goes to ${OUT:-gpu_check}/ as one file.
#
#   bash bench/gpu_check.sh prepare   # on a machine with the package index: wheels of
#                                     # what a bare GPU image lacks, into .device/wheels
#   bash bench/gpu_check.sh bench     # on the GPU: the benches (about 5 minutes on an H100)
#   bash bench/gpu_check.sh tests     # on the GPU: the suite (what reads a dataset is
#                                     # skipped where TensorFlow is absent)
#
# The wheels are installed with --no-index into .device/site, which goes first on
# PYTHONPATH; the image's own packages stay as they are. PYTHON (default python3) is the
# interpreter, PYVER (default 3.12) its version for `prepare`; TRAIN_BATCH, FWD_BATCH and
# REPEATS scale the benches down (a CPU run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-bench}"
py="${PYTHON:-python3}"
out="${OUT:-gpu_check}"
site=.device/site
wheels=.device/wheels

if [[ $part == prepare ]]; then
  # Pure-Python or manylinux wheels, pinned as in requirements.txt.
  mapfile -t pins < <(grep -E '^(ml-collections|google-crc32c)==' requirements.txt)
  exec "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" "${pins[@]}"
fi
if [[ $part != bench && $part != tests ]]; then
  echo "usage: bash bench/gpu_check.sh prepare|bench|tests" >&2
  exit 2
fi

mkdir -p "$out"
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-deps --no-index --target "$site" "$wheels"/*.whl || exit 1
fi
export PYTHONPATH="$PWD/$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
} | tee "$out/device.txt"

if [[ $part == tests ]]; then
  "$py" -m pytest -q -p no:cacheprovider -rs 2>&1 | tail -60 | tee "$out/tests.txt"
  exit "${PIPESTATUS[0]}"
fi

status=0
for dtype in float32 bfloat16; do
  "$py" bench/unet_bench.py --dtype "$dtype" --chunk 0 --repeats "${REPEATS:-10}" \
    --train_batch "${TRAIN_BATCH:-128}" --fwd_batch "${FWD_BATCH:-256}" 2>&1 \
    | tee "$out/unet_$dtype.txt" || status=1
  "$py" bench/sample_bench.py --dtype "$dtype" --no-compile_check --repeats "${REPEATS:-10}" \
    --batch "${FWD_BATCH:-256}" --steps 50 2>&1 | tee "$out/sample_$dtype.txt" || status=1
done
exit "$status"
