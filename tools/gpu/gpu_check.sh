#!/usr/bin/env bash
# The GPU checks, as one prepared run for a lent CUDA machine (the workplace's `device` tool):
#   bash tools/gpu/gpu_check.sh [OUT_DIR]
# 1. tests/test_gpu.py and the CUDA test in tests/test_modeling.py (device placement, bf16,
#    flash-attention against sdpa, CLI training with the GPU defaults, the embedded default);
# 2. the README demo on the GPU;
# 3. bench.gpu (flash vs sdpa vision encoder at full size, a 2B training step's MFU);
# 4. the whole test suite, as a user with a GPU (and flash_attn) would run it.
# Packages the machine lacks may travel as wheels in .whl/ (installed into /tmp/site). Where no
# flash_attn is installed, tools/gpu/flash_attn_torch (flash-attn's API over PyTorch's own
# FlashAttention-2 kernels) stands in for it. Logs go to OUT_DIR (default $OUT, else /tmp/gpu_check).
set -u
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$python" -c "import flash_attn" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/flash tools/gpu/flash_attn_torch \
        && export PYTHONPATH=/tmp/flash${PYTHONPATH:+:$PYTHONPATH}
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$python" -c "import importlib.metadata as m, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
for name in ('transformers', 'trl', 'peft', 'accelerate', 'datasets', 'pyarrow', 'av', 'flash-attn'):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, 'MISSING')"
} 2>&1 | tee "$out/env.txt"

timeout 240 "$python" -m pytest tests/test_gpu.py tests/test_modeling.py -k "gpu or flash or cuda" -q -rs -p no:cacheprovider \
    2>&1 | tee "$out/tests.txt"
timeout 60 "$python" -m examples.demo --device cuda 2>&1 | tee "$out/demo.txt"
timeout 180 "$python" -m bench.gpu 2>&1 | tee "$out/bench.txt"
cp bench/out/gpu.json "$out/" 2>/dev/null
timeout 240 "$python" -m pytest tests -q -rs -p no:cacheprovider --tb=short 2>&1 | tee "$out/suite.txt" | tail -15
exit 0
