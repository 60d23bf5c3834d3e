#!/usr/bin/env bash
# CUDA checks of the single-GPU in-process path, for a GPU machine that has torch (Ray is not needed).
#   bash tests/gpu/run_gpu_checks.sh                 # uses python3 (or $PYTHON)
#   RAYTRAINER_GPU_WHEELS=/path/to/wheels bash tests/gpu/run_gpu_checks.sh
#       installs missing pure dependencies (tqdm, pyarrow, pyyaml, onnx...) from that folder, offline,
#       into a throwaway venv that still sees the machine's torch.
# One overall timeout (RAYTRAINER_GPU_TIMEOUT_S, default 600 s); prints PASS/FAIL/SKIP lines and a SUMMARY.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
if [[ -n "${RAYTRAINER_GPU_WHEELS:-}" ]]; then
    venv="$(mktemp -d)/venv"
    "$PYTHON" -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --no-index --find-links "$RAYTRAINER_GPU_WHEELS" \
        $(ls "$RAYTRAINER_GPU_WHEELS" | sed -n 's/^\([A-Za-z0-9_.]*\)-[0-9].*\.whl$/\1/p' | sort -u) || exit 1
    PYTHON="$venv/bin/python"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/INFO gpu: /'
timeout --signal=TERM --kill-after=10 "${RAYTRAINER_GPU_TIMEOUT_S:-600}" "$PYTHON" tests/gpu/gpu_checks.py "$@"
status=$?
if [[ $status -eq 124 ]]; then
    echo "FAIL timeout: the checks did not finish within ${RAYTRAINER_GPU_TIMEOUT_S:-600} s"
fi
exit $status
