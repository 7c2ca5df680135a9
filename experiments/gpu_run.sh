#!/usr/bin/env bash
# One prepared GPU-machine run (no network there): install ditdeploy offline, then one of
#   bash experiments/gpu_run.sh first      # <= 5 min: environment + bf16 matmul peak, eager bf16, AOTI bf16 b2/b32
#                                          # plain and as CUDA graphs, AOTI FP8 b32 (cosine vs fp32); run this first
#   bash experiments/gpu_run.sh engines    # experiments/gpu_engines.py: eager fp16/bf16, AOTI bf16/fp8/fp16 (+CUDA
#                                          # graphs), e2e, torch.compile max-autotune, TensorRT if importable (< 8 min)
#   bash experiments/gpu_run.sh            # experiments/gpu_torch.py (PyTorch CUDA parity/speed/e2e) + CUDA training
#   bash experiments/gpu_run.sh dry-run    # the engines plan only (settings, hooks found); no GPU needed
#   bash experiments/gpu_run.sh tiny       # the engines code path on the CPU (digits model, tiny counts)
# Everything lands under $OUT (default /tmp/gpu_run); copy $OUT/gpu/*.json into bench/results/ with the machine's
# name (the JSON carries nvidia-smi / torch / CUDA / toolkit / CPU facts). Every measured row is written as soon as it
# exists, so a timeout keeps what was measured. Exit status: 0 when every python step exited 0, else 1 (2: usage).
#
# Install: `pip install -e .` (offline, no build isolation), else `pip install .`; INSTALL=0 skips both. When
# ditdeploy is then not importable *from this checkout* (pip failed: e.g. an old setuptools without `wheel`), the
# package-dir mapping of pyproject.toml (ditdeploy.export <- export/, ...) is rebuilt in a private copy of the
# checkout and every python step runs from there: run from the repository root, the source folder ditdeploy/ (which
# has no export/, runtimes/, bench/) would shadow any copy on PYTHONPATH.
set -u
MODE=${1:-torch}
case "$MODE" in
  torch|engines|first|dry-run|tiny) ;;
  *) echo "usage: bash experiments/gpu_run.sh [torch|engines|first|dry-run|tiny]" >&2; exit 2 ;;
esac
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/gpu_run}
INSTALL=${INSTALL:-1}
BENCH_S=${BENCH_S:-270}
TEST_S=${TEST_S:-120}
ENGINES_S=${ENGINES_S:-400}        # hard limit of the engines run (its own budget is 30 s less)
FIRST_S=${FIRST_S:-290}            # first: the whole script, install included, ends within this many seconds
TINY_S=${TINY_S:-300}
PIP_S=120; [ "$MODE" = first ] && PIP_S=45
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/gpu" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
RUN_DIR=$REPO
SHIM=""
trap '[ -n "$SHIM" ] && rm -rf "$SHIM"' EXIT
status=0

# ditdeploy, its mapped subpackages and the experiments importable from $RUN_DIR's own files
importable() {
  (cd "$RUN_DIR" && python3 - "$RUN_DIR" <<'EOF'
import os, sys
import ditdeploy, ditdeploy.bench, ditdeploy.calibration, ditdeploy.export, ditdeploy.runtimes, experiments
root = os.path.realpath(sys.argv[1])
mods = [ditdeploy, ditdeploy.export, ditdeploy.runtimes, ditdeploy.bench, ditdeploy.calibration, experiments]
bad = [m.__name__ for m in mods if not os.path.realpath(m.__file__).startswith(root + os.sep)]
sys.exit(f"not from {root}: {', '.join(bad)}" if bad else 0)
EOF
  )
}

# run NAME SECONDS LOG CMD...: one python step from $RUN_DIR; its exit status is logged and remembered
run() {
  local name=$1 secs=$2 log=$3 rc
  shift 3
  (cd "$RUN_DIR" && timeout "$secs" "$@") > "$log" 2>&1
  rc=$?
  echo "$name exit $rc" >> "$log"
  [ "$rc" -eq 0 ] || status=1
  return 0
}

if [ "$MODE" != dry-run ] && [ "$MODE" != tiny ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
{
  python3 -c 'import sys, torch, onnxruntime as o; print(sys.version); print("torch", torch.__version__,
torch.version.cuda, torch.cuda.is_available()); print("ort", o.__version__, o.get_available_providers())'
  python3 -c 'import tensorrt as t; print("tensorrt", t.__version__)' 2>/dev/null || echo "tensorrt: not importable"
  if [ "$INSTALL" = 1 ]; then
    # editable install without build isolation works offline (setuptools + wheel are in the image)
    timeout "$PIP_S" python3 -m pip install --no-deps --no-build-isolation --no-index -e . -q \
      || timeout "$PIP_S" python3 -m pip install --no-deps --no-build-isolation --no-index . -q \
      || echo "pip install failed"
  fi
  if ! importable; then
    # the package-dir mapping of pyproject.toml rebuilt in a private copy of the checkout; steps run from there
    SHIM=$(mktemp -d "${TMPDIR:-/tmp}/ditdeploy_gpu_run.XXXXXX") \
      && cp -r ditdeploy experiments tests export calibration runtimes bench pyproject.toml "$SHIM/" \
      && for d in export calibration runtimes bench; do cp -r "$d" "$SHIM/ditdeploy/$d"; done \
      && RUN_DIR=$SHIM && echo "using the mapped copy $SHIM"
    importable || echo "error: ditdeploy is not importable from this checkout, installed or mapped"
  fi
  (cd "$RUN_DIR" && python3 -m ditdeploy.runtimes.torch_env) || true
} > "$OUT/install.txt" 2>&1
importable > /dev/null 2>&1 || { tail -n 5 "$OUT/install.txt"; exit 1; }

E=(python3 -m experiments.gpu_engines --out "$OUT/gpu")
case "$MODE" in
  engines) run gpu_engines "$ENGINES_S" "$OUT/gpu_engines.log" "${E[@]}" --budget-s $((ENGINES_S - 30)) ;;
  first) left=$((FIRST_S - SECONDS - 5))  # SECONDS: since the script started (install and reports included)
         [ "$left" -ge 30 ] || left=30
         run gpu_engines "$left" "$OUT/gpu_engines.log" "${E[@]}" --plan first --budget-s $((left - 15)) ;;
  dry-run) run gpu_engines 120 "$OUT/gpu_engines.log" "${E[@]}" --dry-run ;;
  tiny) run gpu_engines "$TINY_S" "$OUT/gpu_engines.log" "${E[@]}" --device cpu --tiny \
          --sections "${TINY_SECTIONS:-eager,e2e,tensorrt}" ;;
  torch)
    run gpu_torch "$BENCH_S" "$OUT/gpu_torch.log" python3 -m experiments.gpu_torch --out "$OUT/gpu"
    run pytest "$TEST_S" "$OUT/pytest_ddp.txt" python3 -m pytest -q -p no:cacheprovider tests/test_training_ddp.py
    ;;
esac
tail -n 3 "$OUT/install.txt" "$OUT"/*.log "$OUT"/pytest_ddp.txt 2>/dev/null
exit "$status"
