#!/usr/bin/env bash
# The first run on a GPU machine (one H100/H200), as ONE command of about 8.5 minutes (BUDGET seconds, default 500):
#
#   BUDGET=500 bash scripts/gpu_first_run.sh      # results under $OUT (default /tmp/gpu_out), a table at the end
#   SMOKE=1 bash scripts/gpu_first_run.sh         # the same plumbing on a CPU, tiny (tests/test_gpu_first_run.py)
#
#   stage               what it answers                                                    budget (s)
#   0   env             versions; a flax / tokamax from .whl/ where the machine's does not import
#   1   probe           what `auto` picks and why (jsft's own probes); cuDNN on CUDA 13 at all?; packed cudnn,    150
#                       tokamax, pallas right vs float32 at head dim 128/64, GQA 32/8, bf16, L=2048; the cuDNN
#                       bound's temp memory; jsft's train step on a tiny model
#   2   attn timing     fwd+bwd ms and useful TFLOP/s: cudnn(M=8), cudnn(M=L//16), tokamax, xla, pallas at       120
#                       L=8192 and 16384
#   3   1B full FT      benchmarks/gpu.py 1b-full: step ms, tokens/s, MFU, HFU, peak memory, compile s          150
#   4   8B LoRA         benchmarks/gpu.py 8b-lora, the same for Llama-3-8B shapes                    what is left
#   5   1B full, xla    what a user without a flash kernel gets (only if >= 100 s are left)
#
# Every stage is its own process (the GPU memory of one is free for the next) with its own time limit inside the
# overall budget, and writes its JSON as it goes; a stage that fails or runs out of time does not stop the next.
# The model stages run attention "auto": jsft probes cudnn -> tokamax -> pallas and falls back past any that fails.
#
# The GPU machine has no network: bring the wheels it may lack, downloaded beforehand on a machine that has one
# (into the git-ignored .whl/, carried along with the working tree):
#   bash scripts/gpu_wheels.sh          # flax 0.12.12 (flax 0.12.8 does not import with jax 0.11), tokamax + deps
set -u
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-500}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "=== $*" | tee -a "$OUT/log.txt"; }

stage() {  # stage NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2 l
  shift 2
  l=$(left)
  if ((l < 30)); then say "$name: SKIPPED, ${l}s of budget left"; return 0; fi
  ((max > l - 5)) && max=$((l - 5))
  say "$name (limit ${max}s, ${l}s left) $*"
  local t0=$SECONDS n
  n=$(wc -l <"$OUT/log.txt")
  timeout -k 10 "$max" "$@" >>"$OUT/log.txt" 2>&1
  local rc=$?
  tail -n +"$((n + 1))" "$OUT/log.txt" | grep -v "PyTorch was not found" | tail -n 12 | cut -c1-400
  say "$name: rc=$rc in $((SECONDS - t0))s"
}

# 0. Packages the machine lacks or cannot import, from .whl/ (installed beside the machine's, never over them): one
# wheel for each module that does not import (flax first: the others may fail only because of it).
export PYTHONPATH=$OUT/site${PYTHONPATH:+:$PYTHONPATH}
WHEELS="flax.nnx:flax typeguard:typeguard jaxtyping:jaxtyping wadler_lindig:wadler_lindig einshape:einshape
  immutabledict:immutabledict annotated_types:annotated_types typing_inspection:typing_inspection
  pydantic_core:pydantic_core pydantic:pydantic qwix:qwix tokamax:tokamax"
MISSING=$($PY -c "
import importlib, sys
for pair in sys.argv[1:]:
    try:
        importlib.import_module(pair.split(':')[0])
    except Exception:
        print(pair.split(':')[1])
" $WHEELS 2>/dev/null)
for name in $MISSING; do
  if ls .whl/"$name"-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT/site" \
      .whl/"$name"-*.whl >>"$OUT/log.txt" 2>&1 && say "$name from .whl/ installed into $OUT/site"
  else
    say "$name does not import and .whl/ has no wheel for it (bash scripts/gpu_wheels.sh)"
  fi
done

nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv \
  >>"$OUT/log.txt" 2>&1 || true
$PY -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|flax|optax|orbax|tokamax|transformers|numpy|nvidia-cudnn|nvidia-cublas|nvidia-cuda-nvcc|nvidia-nvjitlink|triton) " \
  >>"$OUT/log.txt" 2>&1 || true

# cuDNN 9.13.x-9.14.x: an illegal memory access for padding-causal masks with kv length > 1024 inside CUDA graphs
# (TransformerEngine PR 2344), which kills the process. jsft refuses cuDNN there unless command buffers leave cuDNN
# out (jsft.model.kernels.cudnn_unavailable_reason); XLA reads the flag at start, so it is set here, before any stage.
CUDNN_V=$($PY -c "from jax._src.lib import cuda_versions as c; print(c.cudnn_get_version() if c else 0)" 2>/dev/null || echo 0)
say "cuDNN $CUDNN_V"
if ((CUDNN_V >= 91300 && CUDNN_V < 91500)); then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
  say "cuDNN 9.13/9.14: XLA command buffers off (XLA_FLAGS=$XLA_FLAGS)"
fi

if [[ -n "${SMOKE:-}" ]]; then  # about a minute of CPU in all; the limits leave room for a busy machine
  stage probe 300 $PY scripts/gpu_probe.py --smoke --out "$OUT/probe.json"
  stage attn_timing 200 $PY scripts/gpu_probe.py --smoke --timing --out "$OUT/attn_timing.json"
  stage bench_smoke 300 $PY benchmarks/gpu.py --smoke --configs smoke-lora --peak-tflops 0.001 \
    --out "$OUT/bench_smoke.json"
else
  stage probe 150 $PY scripts/gpu_probe.py --out "$OUT/probe.json"
  stage attn_timing 120 $PY scripts/gpu_probe.py --timing --lengths 8192 16384 --out "$OUT/attn_timing.json"
  stage bench_1b_full 150 $PY benchmarks/gpu.py --configs 1b-full --timeout 140 --out "$OUT/bench_1b.json"
  L=$(left)
  stage bench_8b_lora $((L - 10)) $PY benchmarks/gpu.py --configs 8b-lora --set steps=4 --timeout $((L - 25)) \
    --out "$OUT/bench_8b_lora.json"
  if (($(left) >= 100)); then
    stage bench_1b_full_xla 95 $PY benchmarks/gpu.py --configs 1b-full-xla --set steps=3 --timeout 85 \
      --out "$OUT/bench_1b_xla.json"
  fi
fi
$PY scripts/gpu_summary.py "$OUT" | tee -a "$OUT/log.txt" || true
say "total $((SECONDS - START))s"
