#!/usr/bin/env bash
# The one prepared GPU check (about 13 minutes on one H100/H200): the CUDA tests (compiled FlexAttention
# forward+backward, the sparse kernel, bf16, a tiny training run, no recompiles when two bucket lengths
# alternate; block swap: same gradients, peak drop, step time; the int8/float8 base on the GPU), then the CUDA training-step and attention benchmarks at the real Wan2.1 dimensions (12 and 40
# heads x 128, 480p and 720p; compiled flex fwd+bwd vs SDPA's cuDNN/flash backends, with the goal
# flex >= 0.8 x (1/density) x dense printed beside each figure), which write their sections of
# benchmarks/RESULTS.md with the card's name; then the published model configs (one block each, real width)
# against the token-mask oracle at the real 480p geometry, and, with 2+ GPUs, Ulysses sequence parallelism
# on NCCL (split vs whole parity on 2 GPUs, and the step time of a 1.3B-width model at 81 frames 480p).
#
# Where Python packages cannot be installed from the network (a lent GPU machine), first fetch the
# wheels here with `benchmarks/gpu_check.sh --fetch-wheels` (into .whl/, gitignored) and carry `.whl`
# along; the check installs them into /tmp/site. Logs and RESULTS.md go to $OUT (default runs/gpu_check).
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    # Pure-Python pins plus PyAV for CPython 3.12 on x86-64 (the GPU image's Python); ~56 MB.
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 peft==0.21.2 transformers==5.23.0 av==18.1.0 torchao==0.18.0
fi

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers',
transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

status=0
stage() {  # stage NAME SECONDS COMMAND...: one bounded step; a failure or timeout is recorded, the rest still runs
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || status=1
}

stage tests 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_train_offload.py
stage train_step 150 python3 benchmarks/train_step.py --device cuda
stage attention 260 python3 benchmarks/attention.py --device cuda
stage real_configs 150 env RADIAL_LORA_REAL_GEOMETRY=1 python3 -m pytest -q -p no:cacheprovider \
    tests/test_models_real_configs.py
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
    python3 -c "from radial_lora.models.tiny import save_tiny_pipeline as s; s('wan', '$OUT/tiny_wan');
s('hunyuan', '$OUT/tiny_hunyuan')" >/dev/null 2>&1
    stage sequence_parallel 240 env SP_DEVICE=cuda torchrun --nproc-per-node 2 \
        tests/workers/sequence_parallel_parity.py "$OUT/sequence_parallel.json" "$OUT/tiny_wan" \
        "$OUT/tiny_hunyuan" "$OUT/sp_scratch"
    cat "$OUT/sequence_parallel.json" 2>/dev/null
else
    echo "== sequence_parallel: skipped (one GPU)"
fi
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit $status
