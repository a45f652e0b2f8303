#!/usr/bin/env bash
# Everything a GPU session checks, in one command of under 10 minutes, for a machine with CUDA PyTorch but no internet
# and no diffusers (this project's `device` machines: torch, accelerate, peft, safetensors, ... are there).
#
#   here, with PyPI at hand:   make device-wheels   # the diffusers wheel into .whl/, Fashion-MNIST into .data/ (ignored)
#   on the GPU machine:        bash scripts/device_check.sh   # the device tool: carry [".whl", ".data"], timeout_s 590
#                              bash scripts/device_check.sh compile  # torch.compile of SD1.5 vsd alone (~3 min)
#                              bash scripts/device_check.sh jvp      # the JVP attention kernel's benchmark (~5 min)
#
# The default run writes into $OUT (default runs/device_check), most telling part first, each part under its own time
# limit so a slow part cannot cost the others their output:
#   test_gpu.log       tests/training/test_gpu.py: GPU training matches CPU training, no host sync in an iteration
#                      (train.noise host and device);
#   gpu_check.log and benchmarks_gpu.md   scripts/gpu_check.py: SD1.5- and SDXL-size networks, vsd and sid steps in
#                      bf16 with SDPA and xformers where installed, their measured peak memory beside the peak that
#                      `stepdistill plan` predicts;
#   jvp_tests.log      tests/kernels/test_jvp_attention.py compiled on the GPU (the Triton attention-JVP kernel of
#                      stepdistill/kernels/jvp_attention.py, elsewhere tested in Triton's interpreter).
# `compile` appends torch.compile rows of one configuration (compiling a UNet takes minutes); `jvp` runs
# scripts/jvp_attention_check.py: the JVP of one attention layer at SD1.5 / SDXL / SANA sequence lengths and of whole
# SD1.5 / SDXL UNets, kernel against SDPA's math backend (ms, tokens/s, peak memory, the kernel's error). Copy the new
# sections of benchmarks_gpu.md into docs/benchmarks_gpu.md.
set -u
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=$PWD:/tmp/site
fi
[ -d .data/fashion-mnist ] && export STEPDISTILL_FASHION_ROOT=$PWD/.data/fashion-mnist  # sCM's real images
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cuda', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/env.txt"

report="$OUT/benchmarks_gpu.md"
python3 -c 'import triton; print("triton", triton.__version__)' 2>&1 | tee -a "$OUT/env.txt"
case "${1:-}" in
compile)
    timeout 200 python3 scripts/gpu_check.py --backends compile --sizes sd15 --objectives vsd --iterations 5 \
        --warmup 3 --report "$report" 2>&1 | tee "$OUT/gpu_check.log" ;;
jvp)
    timeout 280 python3 scripts/jvp_attention_check.py --report "$report" 2>&1 | tee "$OUT/jvp_check.log" ;;
"")
    xdist=$(python3 -c 'import xdist' 2>/dev/null && echo '-n 8')  # the recipes' GPU and CPU runs side by side
    # -v names each result as it comes (a part stopped by its limit prints no summary); --timeout reports a slow test
    slow=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo '--timeout 150')
    OMP_NUM_THREADS=2 timeout 240 python3 -m pytest -v -rfE --tb=short $slow -W ignore -p no:cacheprovider \
        $xdist tests/training/test_gpu.py 2>&1 | grep -v PytestBenchmarkWarning | tee "$OUT/test_gpu.log"
    timeout 200 python3 scripts/gpu_check.py --backends sdpa xformers --iterations 5 --warmup 2 --report "$report" \
        2>&1 | tee "$OUT/gpu_check.log"
    OMP_NUM_THREADS=2 timeout 100 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider \
        tests/kernels/test_jvp_attention.py 2>&1 | tee "$OUT/jvp_tests.log" ;;
*)
    echo "usage: bash scripts/device_check.sh [compile|jvp]" >&2; exit 2 ;;
esac
echo "device check ${1:-} done: $OUT"
