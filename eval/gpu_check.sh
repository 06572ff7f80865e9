#!/usr/bin/env bash
# The GPU checks of issue 21 in one run, for the day a device is lent (not run yet: none was lent to that task).
# Inside 8 minutes, without network, on synthetic activations:
#   1. CUDA test cases: the fake-device audit, the compile and sync-free tests, on a machine with CUDA;
#   2. eval/gpu_check.py: soft_topk on CUDA against a float64 CPU solve and beside torch.topk (4096 x 16384), one
#      SoftSAE step on CUDA against CPU, and the step time per phase at 2304 / 16384, batch 4096, bf16 autocast,
#      beside SAE-Lens' TopK, with the host syncs each step makes.
# The device machine runs its image's python3 (PyTorch, pytest; no SAE-Lens): what needs SAE-Lens says so and is
# skipped unless its wheels travel along (device README: `.whl` carried and installed into /tmp/site first).
#   run: bash eval/gpu_check.sh            results: $OUT/gpu_check.csv and $OUT/gpu_check.log
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PYTHON (torch: $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>&1))"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
missing=$("$PYTHON" - <<'PY'
import importlib.util
print(" ".join(m for m in ("sae_lens", "pytest") if importlib.util.find_spec(m) is None))
PY
)
[ -n "$missing" ] && echo "gpu_check: missing here: $missing (the steps that need them are skipped)"

if [[ " $missing " != *" sae_lens "* && " $missing " != *" pytest "* ]]; then
    timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fake_cuda.py tests/test_sync_free.py \
        tests/test_compile.py || echo "gpu_check: test cases FAILED or ran out of time"
fi
timeout 270 "$PYTHON" eval/gpu_check.py "$OUT" || echo "gpu_check: eval/gpu_check.py FAILED or ran out of time"
