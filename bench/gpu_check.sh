#!/usr/bin/env bash
# The GPU check in one command: installs the check's missing packages OFFLINE, then runs
# bench/gpu_check.py (SFT, rollout, ranking and learner steps of the tiny model on one GPU, bf16,
# nccl, DeepSpeed world size 1, no Ray, no vLLM). Exits non-zero on any failure.
#
#   bash bench/gpu_check.sh [REPORT.json]           # default report: $OUT/gpu_check.json when $OUT is set
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh    # dry run on the CPU (gloo, float32)
#
# Before: `bash bench/gpu_wheels.sh` on a machine with the package index (writes
# bench/gpu_wheels/cp312.tar.xz, ~52 MiB). With the `run` tool of this workplace:
#   carry: ["bench/gpu_wheels/cp312.tar.xz"], command: "bash bench/gpu_check.sh", timeout_s: 420
#
# Environment (all optional):
#   GPU_CHECK_DEVICE   cuda (default) or cpu
#   GPU_CHECK_DTYPE    model.dtype: bfloat16 (default on cuda), float32 (default on cpu), float16
#   GPU_CHECK_PYTHON   the Python that holds torch (default: python3)
#   GPU_CHECK_WHEELS   a wheel folder or a .tar.xz of one (default: bench/gpu_wheels/cpXY[.tar.xz]
#                      for that Python); GPU_CHECK_WHEELS=none skips the install
#   GPU_CHECK_ARGS     more arguments for gpu_check.py (e.g. "--zero-stage 3 --rl-steps 2")
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${GPU_CHECK_PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
REPORT=${1:-}
if [[ -z "$REPORT" && -n "${OUT:-}" ]]; then
    REPORT=$OUT/gpu_check.json
fi
LOG=""
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    LOG=$OUT/gpu_check.log
    exec > >(tee "$LOG") 2>&1
    TEE_PID=$!
fi

echo "== gpu_check: device $DEVICE, python $($PY -c 'import sys; print(sys.version.split()[0])') at $(command -v "$PY")"
if [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi

# ---- install what is missing, offline
TAG=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS=${GPU_CHECK_WHEELS:-}
if [[ -z "$WHEELS" ]]; then
    if [[ -d "$ROOT/bench/gpu_wheels/$TAG" ]]; then
        WHEELS=$ROOT/bench/gpu_wheels/$TAG
    elif [[ -f "$ROOT/bench/gpu_wheels/$TAG.tar.xz" ]]; then
        WHEELS=$ROOT/bench/gpu_wheels/$TAG.tar.xz
    fi
fi
INSTALL="ok"
INSTALL_START=$(date +%s.%N)
if [[ "$WHEELS" == none ]]; then
    INSTALL="skipped"
elif [[ -z "$WHEELS" ]]; then
    echo "no wheels for $TAG under bench/gpu_wheels/ (run bench/gpu_wheels.sh --python X.Y); installing nothing"
    INSTALL="not run"
else
    if [[ "$WHEELS" == *.tar.xz ]]; then
        UNPACK=$(mktemp -d)
        echo "== unpacking $WHEELS"
        tar -xJf "$WHEELS" -C "$UNPACK" || INSTALL="FAIL: cannot unpack $WHEELS"
        WHEELS=$(find "$UNPACK" -name requirements.txt -printf '%h\n' | head -n1)
    fi
    if [[ "$INSTALL" == ok ]]; then
        echo "== pip install --no-index --find-links $WHEELS -r $WHEELS/requirements.txt"
        # Only what the machine lacks: requirements already satisfied stay as they are.
        PIP_LOG=$(mktemp)
        PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= $PY -m pip install --no-index --no-cache-dir --disable-pip-version-check \
            --find-links "$WHEELS" -r "$WHEELS/requirements.txt" >"$PIP_LOG" 2>&1
        PIP_RC=$?
        grep -v '^Requirement already satisfied' "$PIP_LOG"
        rm -f "$PIP_LOG"
        [[ $PIP_RC -ne 0 ]] && INSTALL="FAIL: pip install exited with $PIP_RC"
        if ! $PY -m pip check >/dev/null 2>&1; then
            echo "pip check reports problems (shown, not fatal):"
            $PY -m pip check 2>&1 | head -n 20
        fi
        MISSING=$($PY - "$WHEELS/requirements.txt" <<'EOF'
import sys
from importlib import metadata
from packaging.requirements import Requirement
bad = []
for line in open(sys.argv[1]):
    if line.strip():
        req = Requirement(line.strip())
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            bad.append(f"{req.name} missing")
            continue
        if version not in req.specifier:
            bad.append(f"{req.name} {version} does not satisfy {req}")
print("; ".join(bad))
EOF
)
        MISSING_RC=$?
        [[ $MISSING_RC -ne 0 ]] && MISSING="cannot compare the installed versions with requirements.txt"
        [[ -n "$MISSING" && "$INSTALL" == ok ]] && INSTALL="FAIL: $MISSING"
    fi
fi
INSTALL_S=$($PY -c "import time; print(round(time.time() - $INSTALL_START, 1))")
echo "== install: $INSTALL (${INSTALL_S} s)"

# ---- the check
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR=$DEVICE
# NCCL says why when it cannot start (a sandboxed machine may lack what it probes).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# DeepSpeed JIT-builds ops into a folder named by Python and CUDA versions only: keep ours apart.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/gpu_check_torch_extensions}
ARGS=(--device "$DEVICE" --install "$INSTALL" --install-s "$INSTALL_S")
[[ -n "${GPU_CHECK_DTYPE:-}" ]] && ARGS+=(--dtype "$GPU_CHECK_DTYPE")
[[ -n "$REPORT" ]] && ARGS+=(--report "$REPORT")
# shellcheck disable=SC2206
[[ -n "${GPU_CHECK_ARGS:-}" ]] && ARGS+=($GPU_CHECK_ARGS)
cd "$ROOT" || exit 2
$PY -u bench/gpu_check.py "${ARGS[@]}"
STATUS=$?
[[ -n "${UNPACK:-}" ]] && rm -rf "$UNPACK"
if [[ -n "${TEE_PID:-}" ]]; then  # let tee finish the log before $OUT is collected
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
fi
exit $STATUS
