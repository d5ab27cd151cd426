#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine with a short time budget.
#
#   benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [OUT_DIR]
#
# Within the budget (default 480 s = 8 minutes, all steps together; every step runs under
# `timeout` with what is left, and a step that runs out is recorded and the next one still runs):
#
#   1. install  what is missing, from the wheels carried in .whl/ in the repository root
#               (gitignored; pip --no-index: the machine needs no network), into a venv in
#               $TMPDIR (one that sees the system's packages, so a preinstalled CUDA torch is used);
#               onnxruntime-gpu replaces the CPU onnxruntime where its wheel is there; then
#               deris itself, editable, without dependencies
#   2. pytest   the kernel tests compiled on the GPU: pytest -m gpu with TRITON_INTERPRET=0
#   3. kernels  benchmarks/kernels.py (Triton kernels against their PyTorch references)
#   4. latency  benchmarks/latency.py on deris-b-grefcoco (random weights) for torch, torch-fp16
#               and torch-bf16 over 384..1024 and batch 1, 8, 32
#   5. ort      benchmarks/latency.py for torch and onnxruntime at 384, batch 1 and 8, where the
#               CUDA execution provider installed (one ONNX export, the slowest step)
#
# Everything lands in OUT_DIR (default: $OUT, else benchmarks/results/gpu-check-<UTC time>):
# gpu_check.md (what ran, how long, with what result), environment.txt, logs/<step>.log and the
# steps' own outputs (pytest.xml, kernels.md, latency-*/), ready to commit.
#
# --dry-run (what CI runs on a CPU machine, so the script cannot rot): the same argument
# parsing, environment record and plan; the install step only lists what it would install;
# pytest, kernels and ort print the commands they would run; the latency step runs its command
# on the CPU on deris-tiny (128 px, batch 1, one run, PyTorch float32, the GPU step's stages).
#
# Exit code: 0 when every step that ran passed, 1 when one failed or ran out of time, 2 for bad
# usage.

set -uo pipefail

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

DRY_RUN=0
BUDGET_S=480
OUT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --budget)
            [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget needs a number of seconds" >&2; exit 2; }
            BUDGET_S=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$OUT_DIR" ] || { echo "gpu_check.sh: one output folder only, got $OUT_DIR and $1" >&2; exit 2; }
           OUT_DIR=$1 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$OUT_DIR/logs" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
START=$SECONDS
RESERVE_S=15   # kept for writing the summary after the last step
FAILED=0
ROWS=()

left() { echo $(( BUDGET_S - (SECONDS - START) - RESERVE_S )); }

# run_step NAME CAP COMMAND...: run under `timeout` with min(CAP, what is left), log to logs/NAME.log.
run_step() {
    local name=$1 cap=$2; shift 2
    local limit status began=$SECONDS
    limit=$(left)
    [ "$cap" -lt "$limit" ] && limit=$cap
    if [ "$limit" -lt 20 ]; then
        ROWS+=("| $name | skipped: the budget is spent | 0 | |")
        FAILED=1
        return
    fi
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
    status=$?
    tail -n 5 "$OUT_DIR/logs/$name.log"
    local result="passed"
    if [ $status -eq 124 ] || [ $status -eq 137 ]; then result="ran out of time (${limit} s)"; FAILED=1
    elif [ $status -ne 0 ]; then result="failed (exit $status)"; FAILED=1
    fi
    ROWS+=("| $name | $result | $(( SECONDS - began )) | logs/$name.log |")
}

# plan_step NAME COMMAND...: what a dry run does instead of running a GPU step.
plan_step() {
    local name=$1; shift
    echo "== $name (dry run, not run): $*"
    ROWS+=("| $name | dry run: would run \`$*\` | 0 | |")
}

# --- the interpreter ------------------------------------------------------------------------------
if [ $DRY_RUN -eq 1 ]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    [ -x "$PY" ] || PY=$(command -v python3)
else
    VENV=${TMPDIR:-/tmp}/deris-gpu-check-venv
    PY=$VENV/bin/python
    [ -x "$PY" ] || python3 -m venv --system-site-packages "$VENV" || { echo "gpu_check.sh: cannot make the venv $VENV" >&2; exit 1; }
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short=12 HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
    echo "host: $(uname -srm), $(nproc) CPUs"
    echo "python: $("$PY" --version 2>&1) ($PY)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        echo "nvidia-smi: not found (no NVIDIA driver)"
    fi
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

# --- 1. install -------------------------------------------------------------------------------------
# module:wheel pairs the steps import; a module that imports is left alone.
REQUIRED="torch:torch triton:triton numpy:numpy cv2:opencv-python-headless PIL:pillow transformers:transformers
tokenizers:tokenizers sentencepiece:sentencepiece google.protobuf:protobuf safetensors:safetensors tqdm:tqdm
pycocotools:pycocotools scipy:scipy onnx:onnx onnx_ir:onnx-ir onnxscript:onnxscript onnxruntime:onnxruntime-gpu
matplotlib:matplotlib pytest:pytest setuptools:setuptools"
missing_wheels() {
    local pair module
    for pair in $REQUIRED; do
        module=${pair%%:*}
        "$PY" -c "import $module" > /dev/null 2>&1 || echo "${pair#*:}"
    done
    # A CPU-only onnxruntime imports but lacks the CUDA provider: replace it where the wheel is here.
    if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' in o.get_available_providers())" > /dev/null 2>&1 \
            && ls "$ROOT"/.whl/onnxruntime_gpu-*.whl > /dev/null 2>&1; then
        echo onnxruntime-gpu
    fi
}
install() {
    local wanted
    wanted=$(missing_wheels | sort -u | tr '\n' ' ')
    echo "missing: ${wanted:-nothing}"
    if [ -n "$wanted" ]; then
        [ -d "$ROOT/.whl" ] || { echo "no .whl/ folder with the wheels of: $wanted"; return 1; }
        case " $wanted " in *" onnxruntime-gpu "*) "$PY" -m pip uninstall -y onnxruntime > /dev/null 2>&1 ;; esac
        "$PY" -m pip install --no-index --find-links "$ROOT/.whl" $wanted || return 1
    fi
    "$PY" -c "import deris.kernels" > /dev/null 2>&1 \
        || "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" || return 1
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
}

if [ $DRY_RUN -eq 1 ]; then
    would=$(missing_wheels | sort -u | tr '\n' ' ')
    echo "== install (dry run): would install from .whl/: ${would:-nothing}"
    ROWS+=("| install | dry run: would install ${would:-nothing} | 0 | |")
else
    export -f install missing_wheels
    export PY REQUIRED ROOT
    run_step install 120 bash -c install
fi

# --- 2.-5. tests and benchmarks ------------------------------------------------------------------------
export TRITON_INTERPRET=0   # compiled kernels: tests/conftest.py only sets it when unset
LATENCY=("$PY" benchmarks/latency.py --quiet --warmup 3 --runs 10 --settle-ms 0)
PYTEST=("$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml")
KERNELS=("$PY" benchmarks/kernels.py --warmup 5 --iters 20 --out "$OUT_DIR/kernels.md")
LATENCY_GPU=("${LATENCY[@]}" --device cuda --preset deris-b-grefcoco --backends torch,torch-fp16,torch-bf16
             --resolutions 384,512,640,768,1024 --batch 1,8,32 --stages cognition,perception,end_to_end
             --out "$OUT_DIR/latency-torch")
ORT_GPU=("${LATENCY[@]}" --device cuda --preset deris-b-grefcoco --backends torch,onnxruntime --resolutions 384
         --batch 1,8 --work "${TMPDIR:-/tmp}/deris-gpu-check-work" --out "$OUT_DIR/latency-onnxruntime")

if [ $DRY_RUN -eq 1 ]; then
    plan_step pytest "${PYTEST[@]}"
    plan_step kernels "${KERNELS[@]}"
    # The GPU step's stages with PyTorch float32, the backend it has on a CPU (ONNX Runtime's CPU path
    # is tests/test_benchmarks.py's demo sweep; an export here would double the dry run's time).
    run_step latency 300 "${LATENCY[@]}" --device cpu --preset deris-tiny --backends torch --resolutions 128 \
        --batch 1 --runs 1 --warmup 0 --stages cognition,perception,end_to_end --out "$OUT_DIR/latency-dry-run"
    plan_step ort "${ORT_GPU[@]}"
else
    run_step pytest 180 "${PYTEST[@]}"
    run_step kernels 90 "${KERNELS[@]}"
    run_step latency 150 "${LATENCY_GPU[@]}"
    if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2> /dev/null; then
        run_step ort 600 "${ORT_GPU[@]}"
    else
        ROWS+=("| ort | skipped: onnxruntime has no CUDA execution provider here | 0 | |")
    fi
fi

# --- the summary -------------------------------------------------------------------------------------
{
    echo "# GPU check$([ $DRY_RUN -eq 1 ] && echo ' (dry run on the CPU)')"
    echo
    sed 's/^/- /' "$OUT_DIR/environment.txt"
    echo "- budget ${BUDGET_S} s, used $(( SECONDS - START )) s"
    echo
    echo "| step | result | seconds | log |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
} > "$OUT_DIR/.gpu_check.md.tmp" && mv "$OUT_DIR/.gpu_check.md.tmp" "$OUT_DIR/gpu_check.md"
cat "$OUT_DIR/gpu_check.md"
exit $FAILED
