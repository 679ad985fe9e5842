#!/usr/bin/env bash
# The GPU checklist in one command, sized to finish in under 9 minutes on an H100/H200, installs
# included. Run it from the repository root on the GPU machine; results land in $OUT (default
# bench/results/gpu-session):
#
#   bash tools/gpu_session.sh               # on the GPU machine (CUDA required)
#   bash tools/gpu_session.sh --dry-run     # anywhere: the plan, and what of it can be measured here
#
# Steps, each under a hard time limit so that one hung step cannot eat the others' time:
#   setup  the GPU and versions on record; the peers' pinned wheels (tools/gpu_requirements.txt)
#          installed from .whl/ with pip --no-index --no-deps when the image lacks them (that machine
#          reaches no package registry: fetch them beforehand as gpu_requirements.txt says and carry
#          .whl; a peer that is still missing only costs its rows, which read "not installed")
#   tests  every cuda-marked test, plus the compact subset "-k 'cuda or triton'" (the Triton
#          strategies, run natively) of the test files of the three benchmarked losses and the
#          statistics; not the slow ones; pytest-timeout and pytest-xdist used when importable
#   gemm   python -m bench.gemm_rate: bf16 GEMM rate (8192^3 and the library's chunk shapes, fp32
#          output too) and the float64 check of the in-place torch.addmm(..., out=acc) accumulation
#   bench  python -m bench at N = 16384 on the Llama-3-8B head (bf16): cross-entropy, TDPO, DPO; every
#          concrete backend of the library (naive included), F.linear_cross_entropy, Liger's fused
#          linear CE and chunked DPO, Cut Cross-Entropy; time and peak memory. --budget makes the
#          bench itself stop starting rows in time and write its JSON and plot either way
#   model  python -m bench --model --json: the cost model's predictions, to set beside the bench
#
# Result files in $OUT (7, the device tool returns at most 8): session.log (this script's output:
# plan, GPU, versions, installs, the GEMM rates, each step's time and exit code), pytest.log,
# gemm_rate.json, bench.log (the table), the bench's <gpu>-<date>-core.json and .png, model.json.
#
# How the expected times were obtained (the dry-run prints each with its label):
#   * "measured here": run by --dry-run on this (CPU) machine: the Python + torch start-up, the
#     bench's listing of its rows, one bench worker process on a tiny CPU case (a worker's fixed
#     cost: start-up, imports, probe), the pytest collection of the test subset, the wheel install,
#     the cost model (CPU-only, so its time here stands for its time there).
#   * "predicted": the GPU parts, which cannot be measured without a GPU, from the assumptions below
#     (named, with their sources). No GPU time in this script or its output is a measurement.
#   * the step limits: their sum is the session's worst case, and is what must stay under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --dry-run (print the plan, measure its CPU-side costs), --no-measure (with --dry-run: plan only)"
}

dry_run=0
measure=1
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        --no-measure) measure=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option $arg" >&2; usage >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
WHEELS="${TOKPO_WHEELS:-.whl}"
out="${OUT:-bench/results/gpu-session}"
export PYTHONUNBUFFERED=1

# What the bench measures, in this order (the bench runs --impls impl by impl, so if its --budget
# runs out, the rows cut are the last of this list): the library's GPU strategies (its concrete
# backends that run natively only on the GPU, read from its registry at run time, so a new one is
# included with no edit here), the naive baseline (the table's ratios), then the peers (the exact
# ones first). The library's CPU backend (chunked PyTorch) is not timed on the GPU. Peers the
# checklist does not name (torch_lce_chunked, tdpo_reference_code) can be added to TOKPO_GPU_PEERS.
OPS="linear_cross_entropy,tdpo_loss,dpo_loss"
HEAD="llama-3-8b"
N=16384
REPS=5             # timed repetitions per row (20 is the core tier's default: 5 leaves time for more rows)
# The issue's peers, each once: Liger's fused linear CE, F.linear_cross_entropy, Cut Cross-Entropy
# (its exact variant; the default filtered one, "cce", can be added here), Liger's chunked DPO.
PEERS="${TOKPO_GPU_PEERS:-liger_flce,torch_lce,cce_exact,liger_dpo}"
# Prints the --impls list described above (python; the registry decides what is a GPU strategy).
IMPL_ORDER_PY="
import sys
from bench.ops._common import LIBRARY_IMPLS
from bench.registry import get_operation
from tokpo_kernels.backends import backend_entry
gpu = [n for n in LIBRARY_IMPLS if backend_entry(n).emulated_devices]
base = get_operation(sys.argv[1].split(',')[0]).baseline
print(','.join(gpu + [base] + sys.argv[2].split(',')))
"

# Hard limits per step, seconds. Their sum, plus KILL_GRACE per step for a process that ignores
# SIGTERM, is the worst case of the whole session: 505 + 5 x 5 = 530 s = 8.8 min. The bench gets
# what the others leave: it is the step whose rows a shorter budget would cut.
KILL_GRACE=5
LIMIT_SETUP=20
LIMIT_TESTS=60
LIMIT_GEMM=15
LIMIT_BENCH=390
BENCH_BUDGET=360   # the bench's own --budget: it stops starting rows, then writes JSON + plot
WORKER_TIMEOUT=120 # one bench worker process (a hung impl costs at most this)
LIMIT_MODEL=20
PER_TEST_TIMEOUT=60

# Assumptions of the predicted (GPU) times, each overridable by the variable of the same name.
GEMM_TFLOPS="${GEMM_TFLOPS:-790}"       # bf16 8192^3 on random data, H200 of this workplace (769-798 seen)
STEP_EFFICIENCY="${STEP_EFFICIENCY:-0.33}" # a step runs at 1/3 of the GEMM rate (naive and peers are
                                           # slower than the model's 8-12NDV at peak; conservative)
CUDA_INIT_S="${CUDA_INIT_S:-2}"         # CUDA context and cuBLAS handle in a fresh process
INPUTS_S="${INPUTS_S:-2}"               # building a row's inputs on the GPU (1 GiB head, entropy pass)
COMPILE_TRITON_S="${COMPILE_TRITON_S:-20}" # JIT of a Triton backend's kernels, first process of a row
COMPILE_PEER_S="${COMPILE_PEER_S:-10}"  # Liger FLCE / Cut Cross-Entropy Triton kernels
COMPILE_LIGER_DPO_S="${COMPILE_LIGER_DPO_S:-60}" # Liger's chunked DPO: torch.compile, both processes
TEST_GPU_S="${TEST_GPU_S:-2}"           # one test on the GPU: Triton JIT of its variant dominates
XDIST_WORKERS=8                         # 16 cores: JIT compiles run in parallel
PROCS_PER_ROW="${PROCS_PER_ROW:-1}"     # bench/runner.py: one process per row on CUDA (timing, then memory)

# The tests: every file with a cuda-marked test, plus the files of the benchmarked operations.
mapfile -t CUDA_FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py 2>/dev/null)
SUBSET_FILES=(tests/test_vocab_stats_values_and_grads.py tests/test_loss_cross_entropy.py
              tests/test_loss_tdpo.py tests/test_loss_dpo.py tests/test_stats_max_mean_logit.py)
mapfile -t TEST_FILES < <(printf '%s\n' "${CUDA_FILES[@]}" "${SUBSET_FILES[@]}" | sort -u)
TEST_SELECT=(-m "cuda or not slow" -k "cuda or triton")

# The steps' commands, printed by --dry-run exactly as they run.
tests_cmd="$PY -m pytest -q -p no:cacheprovider ${TEST_SELECT[*]@Q} ${TEST_FILES[*]} \$XDIST \$PER_TEST"
gemm_cmd="$PY -m bench.gemm_rate --head $HEAD --n $N --json '$out/gemm_rate.json'"
bench_cmd="$PY -m bench --tier core --ops $OPS --heads $HEAD --n $N --impls \"\$IMPLS\" --reps $REPS"
bench_cmd+=" --timeout $WORKER_TIMEOUT --budget $BENCH_BUDGET --out '$out'"
model_cmd="$PY -m bench --model --json '$out/model.json'"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# --dry-run: the plan, the CPU-side costs measured here, the expected time per step and the total.
# ---------------------------------------------------------------------------------------------
measured_or() {  # measured_or VALUE DEFAULT: VALUE when measuring, else DEFAULT (labelled by the caller)
    if [ "$measure" = 1 ] && [ -n "$1" ]; then echo "$1"; else echo "$2"; fi
}

timed() {  # timed CMD...: run CMD quietly, print its wall seconds (its output is discarded)
    local t0
    t0=$(now)
    "$@" >/dev/null 2>&1
    secs "$t0" "$(now)"
}

dry_run_plan() {
    local tmp label py_s list_s worker_s collect_s n_tests plan_s model_s model_rc pip_s wheel_mib rows
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tokpo-gpu-dry.XXXXXX")
    trap 'rm -rf "$tmp"' RETURN
    echo "# tools/gpu_session.sh --dry-run: the plan of one GPU session (nothing here runs on a GPU)"
    echo "this machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)" \
        "(CPU-side times measured under load are upper bounds)"
    echo "results would go to \$OUT=$out; at most 8 files (7 planned)"
    echo
    label="measured here"
    if [ "$measure" = 0 ]; then label="not measured (--no-measure): assumed"; fi

    # CPU-side costs. Each is the wall time of the real command (or the step's fixed part) here.
    if [ "$measure" = 1 ]; then
        py_s=$(timed "$PY" -c "import torch")
        local t0
        t0=$(now)
        IMPLS=$("$PY" -c "$IMPL_ORDER_PY" "$OPS" "$PEERS" 2>"$tmp/rows.err") \
            && "$PY" -m bench --tier core --ops "$OPS" --heads "$HEAD" --n "$N" --impls "$IMPLS" --list \
            >"$tmp/rows.tsv" 2>>"$tmp/rows.err"
        list_s=$(secs "$t0" "$(now)")
        [ -s "$tmp/rows.tsv" ] || echo "WARNING: listing the bench rows failed: $(tail -1 "$tmp/rows.err")"
        "$PY" - "$tmp/spec.json" <<'PYEOF'
import json, sys
from bench.registry import Shape
shape = Shape(rows=4, seq=64, dim=256, vocab=32000, ignored_prefix=8).tiny()
spec = {"op": "linear_cross_entropy", "impl": "naive", "shape": shape.to_dict(), "dtype": "fp32",
        "device": "cpu", "mode": "time", "reps": 1, "warmup": 1}
json.dump(spec, open(sys.argv[1], "w"))
PYEOF
        worker_s=$(timed "$PY" -m bench._worker "$tmp/spec.json" "$tmp/result.json")
        t0=$(now)
        n_tests=$("$PY" -m pytest -q -p no:cacheprovider --collect-only "${TEST_SELECT[@]}" "${TEST_FILES[@]}" 2>/dev/null \
            | sed -n 's/^\([0-9]*\)\/[0-9]* tests collected.*/\1/p; s/^\([0-9]*\) tests collected.*/\1/p' | head -1)
        collect_s=$(secs "$t0" "$(now)")
        plan_s=$(timed "$PY" -m bench.gemm_rate --head "$HEAD" --n "$N" --plan)
        t0=$(now)
        "$PY" -m bench --model --json "$tmp/model.json" >"$tmp/model.out" 2>&1
        model_rc=$?
        model_s=$(secs "$t0" "$(now)")
        if compgen -G "$WHEELS/*.whl" >/dev/null; then
            t0=$(now)
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$tmp/site" \
                "$WHEELS"/*.whl >/dev/null 2>&1
            pip_s=$(secs "$t0" "$(now)")
            wheel_mib=$(du -sk "$WHEELS" | awk '{ printf "%.1f", $1 / 1024 }')
        fi
    fi
    py_s=$(measured_or "${py_s:-}" 4)
    worker_s=$(measured_or "${worker_s:-}" 8)
    collect_s=$(measured_or "${collect_s:-}" 8)
    n_tests=$(measured_or "${n_tests:-}" 150)
    plan_s=$(measured_or "${plan_s:-}" 5)
    model_s=$(measured_or "${model_s:-}" 10)
    pip_s=$(measured_or "${pip_s:-}" 5)
    if [ -s "$tmp/rows.tsv" ]; then
        rows=$(wc -l <"$tmp/rows.tsv")
    else  # --no-measure: the rows as the registry of this writing orders them (its model FLOPs: 8, 12, 10 NDV)
        local impl op
        for impl in triton_streaming triton_chunked liger_flce cce_exact torch_lce liger_dpo cce naive torch; do
            for op in linear_cross_entropy:6.886e13 tdpo_loss:1.033e14 dpo_loss:8.607e13; do
                case "${op%%:*}:$impl" in
                    tdpo_loss:torch_lce|tdpo_loss:liger_flce|tdpo_loss:cce*|tdpo_loss:liger_dpo) continue ;;
                    dpo_loss:torch_lce|dpo_loss:liger_flce|dpo_loss:cce*|linear_cross_entropy:liger_dpo) continue ;;
                esac
                printf '%s\t%s\t-\tbf16\t%s\n' "${op%%:*}" "$impl" "${op#*:}"
            done
        done >"$tmp/rows.tsv"
        rows=$(wc -l <"$tmp/rows.tsv")
        IMPLS="<the registry's order, computed by setup>"
    fi

    echo "CPU-side costs ($label):"
    echo "  python + import torch                      ${py_s} s"
    echo "  bench: import and list the $rows rows        $(measured_or "${list_s:-}" "-") s"
    echo "  one bench worker process, tiny CPU case     ${worker_s} s   (start-up, imports, probe, 1 step)"
    echo "  pytest collection of the test subset        ${collect_s} s   ($n_tests tests)"
    echo "  bench.gemm_rate start-up and plan           ${plan_s} s"
    echo "  cost model, python -m bench --model --json  ${model_s} s" \
        "$([ "${model_rc:-0}" != 0 ] && echo "(exit ${model_rc}: $(tail -1 "$tmp/model.out"))")"
    if [ -n "${wheel_mib:-}" ]; then
        echo "  pip install of the carried wheels           ${pip_s} s   ($WHEELS: ${wheel_mib} MiB of the 64 MiB a run may carry)"
    else
        echo "  pip install of the carried wheels           ${pip_s} s   (no wheels in $WHEELS: fetch them as tools/gpu_requirements.txt says)"
    fi
    echo
    echo "Assumptions of the predicted GPU parts (override by environment variable):"
    echo "  GEMM_TFLOPS=$GEMM_TFLOPS STEP_EFFICIENCY=$STEP_EFFICIENCY CUDA_INIT_S=$CUDA_INIT_S INPUTS_S=$INPUTS_S"
    echo "  COMPILE_TRITON_S=$COMPILE_TRITON_S COMPILE_PEER_S=$COMPILE_PEER_S COMPILE_LIGER_DPO_S=$COMPILE_LIGER_DPO_S TEST_GPU_S=$TEST_GPU_S"
    echo "  PROCS_PER_ROW=$PROCS_PER_ROW (worker processes per bench row)"
    echo

    # Expected seconds per step: measured CPU parts + predicted GPU parts.
    local e_setup e_tests e_gemm e_bench e_model
    e_setup=$(awk -v py="$py_s" -v pip="$pip_s" 'BEGIN { printf "%.0f", 1 + 2 * py + pip }')
    e_tests=$(awk -v py="$py_s" -v c="$collect_s" -v n="$n_tests" -v t="$TEST_GPU_S" -v w="$XDIST_WORKERS" \
        'BEGIN { printf "%.0f", py + c + n * t / w }')
    e_gemm=$(awk -v py="$py_s" -v ci="$CUDA_INIT_S" -v r="$GEMM_TFLOPS" -v reps="$REPS" \
        'BEGIN { flops = 2 * 2 * 8192^3 + 9 * 2 * 16384 * 4096 * 1300; printf "%.0f", py + ci + 0.5 + 2 + (reps + 1) * flops / (r * 1e12) }')
    echo "Bench rows (predicted seconds: PROCS_PER_ROW=$PROCS_PER_ROW processes x (worker start-up $worker_s s + CUDA init + inputs)"
    echo "  + compile + (warm-up + $REPS fwd + $REPS fwd+bwd + memory run) steps at GEMM_TFLOPS x STEP_EFFICIENCY):"
    e_bench=$(awk -F'\t' -v w="$worker_s" -v ci="$CUDA_INIT_S" -v inp="$INPUTS_S" -v r="$GEMM_TFLOPS" \
        -v eff="$STEP_EFFICIENCY" -v reps="$REPS" -v ct="$COMPILE_TRITON_S" -v cp="$COMPILE_PEER_S" \
        -v cd="$COMPILE_LIGER_DPO_S" -v budget="$BENCH_BUDGET" -v procs="$PROCS_PER_ROW" '
        {
            step = $5 / (r * 1e12 * eff)
            steps = step * (1 + 0.25 * reps + reps + 3)
            c = 0
            if ($2 ~ /^triton/) c = ct
            else if ($2 == "liger_dpo") c = cd
            else if ($2 ~ /^(liger_flce|cce)/) c = cp
            row = procs * (w + ci + inp) + c + steps
            total += row
            if (total <= budget) fit += 1
            flag = total > budget ? "  <- past --budget: would read skipped" : ""
            printf "  %-22s %-18s %6.1f s (steps %5.1f s)  cumulative %6.1f s%s\n", $1, $2, row, steps, total, flag
        }
        END {
            printf "  predicted: %d of %d rows measured within --budget %d s", fit, NR, budget
            printf "%.0f", total > "/dev/stderr"
        }' "$tmp/rows.tsv" 2>"$tmp/bench_total")
    echo "$e_bench"
    e_bench=$(cat "$tmp/bench_total")
    e_model=$(awk -v m="$model_s" 'BEGIN { printf "%.0f", m }')

    echo
    printf '%-6s %-8s %-9s %s\n' step "limit s" "expect s" "command / how the expected time was obtained"
    printf '%-6s %-8s %-9s %s\n' setup "$LIMIT_SETUP" "$e_setup" "nvidia-smi; versions; pip install --no-index --no-deps of missing pinned wheels"
    printf '%-6s %-8s %-9s %s\n' "" "" "" "  $label: python start-up x2 + pip install; +1 s predicted for nvidia-smi"
    printf '%-6s %-8s %-9s %s\n' tests "$LIMIT_TESTS" "$e_tests" "$tests_cmd"
    printf '%-6s %-8s %-9s %s\n' "" "" "" "  $label: start-up + collection; predicted: $n_tests tests x ${TEST_GPU_S} s / $XDIST_WORKERS workers"
    printf '%-6s %-8s %-9s %s\n' gemm "$LIMIT_GEMM" "$e_gemm" "$gemm_cmd"
    printf '%-6s %-8s %-9s %s\n' "" "" "" "  $label: start-up; predicted: CUDA init, 0.5 s clock warm-up, GEMMs at GEMM_TFLOPS, fp64 check 2 s"
    printf '%-6s %-8s %-9s %s\n' bench "$LIMIT_BENCH" "$e_bench" "$bench_cmd"
    printf '%-6s %-8s %-9s %s\n' "" "" "" "  $label: worker start-up; predicted: the rest (rows above); capped by --budget $BENCH_BUDGET"
    printf '%-6s %-8s %-9s %s\n' model "$LIMIT_MODEL" "$e_model" "$model_cmd"
    printf '%-6s %-8s %-9s %s\n' "" "" "" "  $label: the whole step (CPU-only)"
    local limit_total expect_total
    limit_total=$((LIMIT_SETUP + LIMIT_TESTS + LIMIT_GEMM + LIMIT_BENCH + LIMIT_MODEL + 5 * KILL_GRACE))
    expect_total=$(awk -v a="$e_setup" -v b="$e_tests" -v c="$e_gemm" -v d="$e_bench" -v e="$e_model" -v cap="$BENCH_BUDGET" \
        'BEGIN { if (d > cap) d = cap; printf "%.0f", a + b + c + d + e }')
    echo
    echo "total expected: ${expect_total} s = $(awk -v s="$expect_total" 'BEGIN { printf "%.1f", s / 60 }') min" \
        "(bench capped at its --budget of $BENCH_BUDGET s)"
    echo "total of the step limits + ${KILL_GRACE} s kill grace each (worst case): ${limit_total} s = $(awk -v s="$limit_total" 'BEGIN { printf "%.1f", s / 60 }') min;" \
        "fits in 9 min: $([ "$limit_total" -lt 540 ] && echo yes || echo NO)"
}

if [ "$dry_run" = 1 ]; then
    dry_run_plan
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# The session.
# ---------------------------------------------------------------------------------------------
mkdir -p "$out"
exec > >(tee -a "$out/session.log") 2>&1
session_start=$(now)
echo "# tools/gpu_session.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${TOKPO_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

declare -a summary=()
first_rc=0
run_step() {  # run_step NAME LIMIT LOGFILE SHOWN CMD: CMD under a hard limit, its output to LOGFILE and here
    local name="$1" limit="$2" log="$3" shown="$4" cmd="$5" t0 rc
    echo
    echo "== $name (limit ${limit} s): $shown"
    t0=$(now)
    # timeout signals its whole process group, so the python processes under bash -c stop too.
    timeout --kill-after="$KILL_GRACE" "$limit" bash -c "$cmd" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: stopped at its limit of ${limit} s"
    summary+=("$(printf '%-6s rc %-3s %6s s of %s s' "$name" "$rc" "$(secs "$t0" "$(now)")" "$limit")")
    if [ "$first_rc" = 0 ] && [ "$rc" != 0 ]; then first_rc=$rc; fi
}

# Runs in a child shell under the setup step's limit (run_step), so that every fixed cost of the
# session is inside a step's limit: it hands what the later steps need (PYTHONPATH with the installed
# wheels, the pytest options that are importable) back as assignments in the file $ENV_FILE.
# shellcheck disable=SC2329  # invoked as "$(declare -f setup); setup" in run_step's child shell
setup() {
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    if ! "$PY" -c "import platform, sys, torch, triton
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA GPU visible to $PY: nothing to measure (bash tools/gpu_session.sh --dry-run prints the plan)"
        exit 3
    fi
    "$PY" -c "import xdist" 2>/dev/null && echo "XDIST='-n $XDIST_WORKERS'" >>"$ENV_FILE"
    "$PY" -c "import pytest_timeout" 2>/dev/null && echo "PER_TEST='--timeout $PER_TEST_TIMEOUT'" >>"$ENV_FILE"
    local site name version module installed wheel line
    local -a to_install=()
    while IFS= read -r line; do
        line="${line%%#*}"
        line="${line//[[:space:]]/}"
        [ -z "$line" ] && continue
        name="${line%%==*}"
        version="${line#*==}"
        installed=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null)
        wheel=$(compgen -G "$WHEELS/${name//-/_}-${version}-*.whl" | head -1)
        if [ "$installed" = "$version" ]; then
            echo "peer $name $version: in the image"
        elif [ -n "$wheel" ]; then
            to_install+=("$wheel")
        elif [ -n "$installed" ]; then
            echo "peer $name: the image's $installed is used (pinned $version: no wheel in $WHEELS)"
        else
            echo "peer $name: not installed and no wheel $name==$version in $WHEELS: its rows will read 'not installed'"
        fi
    done <tools/gpu_requirements.txt
    if [ "${#to_install[@]}" -gt 0 ]; then
        site=$(mktemp -d "${TMPDIR:-/tmp}/tokpo-site.XXXXXX")
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${to_install[@]}"; then
            echo "SITE='$site' PYTHONPATH='$site${PYTHONPATH:+:$PYTHONPATH}'" >>"$ENV_FILE"
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
            echo "installed from $WHEELS: ${to_install[*]##*/}"
        else
            echo "pip install from $WHEELS failed: those peers' rows will read 'not installed'"
        fi
    fi
    module=$(sed -n 's/.*# import \([A-Za-z_]*\).*/\1/p' tools/gpu_requirements.txt | paste -sd, -)
    "$PY" -c "
import importlib, sys
for m in sys.argv[1].split(','):
    try:
        importlib.import_module(m)
        print(f'import {m}: ok')
    except Exception as exc:  # its rows will carry the same error
        print(f'import {m}: FAILED ({type(exc).__name__}: {exc})'.splitlines()[0])
" "$module"
    echo "IMPLS='$("$PY" -c "$IMPL_ORDER_PY" "$OPS" "$PEERS")'" >>"$ENV_FILE"
}

ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/tokpo-session-env.XXXXXX")
SITE=""
# At exit: the hand-over file, and the wheels' install folder (SITE, set by setup) once the session is over.
trap 'rm -f "$ENV_FILE"; [ -z "$SITE" ] || rm -rf "$SITE"' EXIT
export PY WHEELS ENV_FILE XDIST_WORKERS PER_TEST_TIMEOUT IMPL_ORDER_PY OPS PEERS
run_step setup "$LIMIT_SETUP" /dev/null "GPU and versions; pinned peers from $WHEELS when missing" \
    "$(declare -f setup); setup"
[ "$first_rc" = 3 ] && exit 2  # no GPU
XDIST=""
PER_TEST=""
IMPLS=""  # if setup could not read the registry: every registered impl, case by case
# shellcheck disable=SC1090  # written by setup above: SITE, PYTHONPATH, XDIST, PER_TEST, IMPLS
. "$ENV_FILE"
export PYTHONPATH="${PYTHONPATH:-}" XDIST PER_TEST IMPLS
echo "impls, in run order: $IMPLS"
run_step tests "$LIMIT_TESTS" "$out/pytest.log" "$tests_cmd [XDIST='$XDIST' PER_TEST='$PER_TEST']" "$tests_cmd"
run_step gemm "$LIMIT_GEMM" /dev/null "$gemm_cmd" "$gemm_cmd"
run_step bench "$LIMIT_BENCH" "$out/bench.log" "$bench_cmd" "$bench_cmd"
run_step model "$LIMIT_MODEL" /dev/null "$model_cmd" "$model_cmd"

echo
echo "== summary: $(secs "$session_start" "$(now)") s in all (worst case allowed:" \
    "$((LIMIT_SETUP + LIMIT_TESTS + LIMIT_GEMM + LIMIT_BENCH + LIMIT_MODEL + 5 * KILL_GRACE)) s)"
printf '  %s\n' "${summary[@]}"
mapfile -t files < <(find "$out" -maxdepth 1 -type f | sort)
echo "  ${#files[@]} result files in $out:"
printf '    %s\n' "${files[@]##*/}"
[ "${#files[@]}" -gt 8 ] && echo "  WARNING: more than 8 files: the device tool returns only 8"
exit "$first_rc"
