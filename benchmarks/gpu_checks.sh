#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent machine (no package index there: learn2learn's MAML files
# and the benchmark's episode file travel in .devcarry/, made here by
#   mkdir -p .devcarry && cp -r ~/.cache/lightning_meta/bench/l2l-src .bench/maml_batch_omniglot_0.pt .devcarry/
# after one CPU run of bench_maml_throughput.py with l2l). Output goes to $OUT (default .bench/gpu).
# Usage: bash benchmarks/gpu_checks.sh [rounds] [profile] [memory]   (DEVICE=cpu for a dry run of the script itself)
#   memory: also where the GPU memory peak goes (allocation sites at the peak; the cuBLAS workspace; a smaller one),
#           instead of the fo1/so5 throughput part (measured in docs/bench/archive/maml-diary.md §0d), so that without the profile part
#           the timeouts sum to 580 s, inside one 600 s device call
#   without profile and memory, last: the learned optimizer's step (the default eager and compiled, i.e. fused by
#           Triton, and the opt-in orthogonalised step) against Adam(foreach) and fused AdamW (timeouts then sum to
#           530 s)
set -u
OUT=${OUT:-.bench/gpu}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}; ROUNDS=${1:-2}; PROFILE=${2:-}; MEMORY=${3:-}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/env.txt"
$PY -c "import torch, lightning, torchmetrics; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.txt"
echo "== tests that need CUDA"
timeout 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/algorithms > "$OUT/pytest_gpu.txt" 2>&1; grep -E "passed|failed|Error|assert|^E " "$OUT/pytest_gpu.txt" | tail -30
if [ -n "$PROFILE" ]; then
  echo "== where a step's time goes (32 tasks, so1)"
  for mode in vmap loop; do
    timeout 60 $PY benchmarks/profile_maml_step.py --device "$DEVICE" --tasks 32 --task-mode $mode 2>&1 | tail -14 | tee -a "$OUT/profile.txt"
  done
fi
B="$PY benchmarks/bench_maml_throughput.py --device $DEVICE --l2l-src .devcarry/l2l-src --batch .devcarry/maml_batch_omniglot_0.pt"
echo "== throughput vs learn2learn: 1 inner step, second order (-g: CUDA graphs; -lean: Conv4(lean_ops=True))"
timeout 200 $B --configs so1 --impls l2l,ours-vmap-g,ours-loop-g,ours-loop-g-lean --rounds "$ROUNDS" \
  --warmup 3 --iters 8 --out "$OUT/maml_throughput_${DEVICE}_so1.json" > "$OUT/throughput_so1.txt" 2>&1; tail -12 "$OUT/throughput_so1.txt"
if [ -z "$MEMORY" ]; then  # with the memory part this is skipped: the whole script must fit one 600 s device call
  echo "== first order, and 5 inner steps"
  timeout 120 $B --configs fo1,so5 --impls l2l,ours-vmap-g,ours-loop-g --rounds 1 --warmup 3 --iters 4 \
    --out "$OUT/maml_throughput_${DEVICE}_fo1_so5.json" > "$OUT/throughput_fo1_so5.txt" 2>&1; tail -14 "$OUT/throughput_fo1_so5.txt"
else
  echo "== memory: what is live at the peak (allocation trace; its timings are not the benchmark's)"
  timeout 150 $B --configs so1 --impls l2l,ours-loop-g,ours-loop-g-lean --rounds 1 --warmup 3 --iters 2 --no-flops \
    --memory-trace --out "$OUT/maml_memory_trace_${DEVICE}_so1.json" > "$OUT/memory_trace_so1.txt" 2>&1
  grep -E "^\[so1\]|^ {6}|MiB|Error" "$OUT/memory_trace_so1.txt" | tail -40
  echo "== memory: one 4 MiB cuBLAS workspace per stream instead of PyTorch's default (both sides)"
  timeout 140 $B --configs so1 --impls l2l,ours-loop-g,ours-loop-g-lean,ours-vmap-g --rounds 1 --warmup 3 --iters 8 \
    --blas-workspace :4096:1 --out "$OUT/maml_throughput_${DEVICE}_so1_ws4.json" > "$OUT/throughput_so1_ws4.txt" 2>&1
  tail -12 "$OUT/throughput_so1_ws4.txt"
fi
if [ -z "$PROFILE" ] && [ -z "$MEMORY" ]; then
  echo "== learned optimizer: one step vs Adam(foreach) and fused AdamW (default: eager; -compiled: fused kernels;"
  echo "   -orthogonal: Newton-Schulz on each matrix's direction)"
  timeout 120 $PY benchmarks/bench_lopt_step.py --device "$DEVICE" --threads 4 --repeats 21 --widths 1000 3000 \
    --rules adam adamw-fused default default-compiled default-orthogonal > "$OUT/lopt_step.txt" 2>&1; grep -E "^\||<!--" "$OUT/lopt_step.txt"
fi
