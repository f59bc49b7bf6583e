#!/usr/bin/env bash
# The whole benchmark suite on one CUDA GPU, plus the training MFU of the `small` preset, in under 5 minutes.
#
#   bash benchmarks/gpu.sh [PEAK_BF16_TFLOPS]
#
# PEAK_BF16_TFLOPS: the GPU's dense bf16 peak for MFU (default 989: H100/H200 SXM). Results: bench_results/*-cuda.json
# and the tables printed below. UNRUN: written without a GPU (see docs/performance.md, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK="${1:-989}"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1

"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: run the CPU benchmarks instead"
cap = torch.cuda.get_device_capability()
print(f"{torch.cuda.get_device_name()} sm{cap[0]}{cap[1]}, torch {torch.__version__}")
print("grouped bf16 experts (torch._grouped_mm):", "yes" if cap[0] >= 9 else "no (needs sm90): loop")
EOF

# 1. the MoE layer vs the iso-FLOP dense FFN (fp32 and bf16 weights; T 4096/16384, E 8/32/64, k 1/2, DTS, Zipf)
timeout 120 "$PY" benchmarks/layer.py --device cuda --rounds 5 --impls auto,fused
# 2. the same weights in transformers' Mixtral block (eager, grouped_mm) and the [T, E, T] reference formulation
timeout 60 "$PY" benchmarks/peers.py --device cuda --rounds 5
# 3. training tokens/s of GPT-MoE vs dense, default shape (bf16 autocast)
timeout 45 "$PY" benchmarks/train.py --device cuda --precision bf16 --rounds 3 --steps 5
# 4. the small preset (d_model 768, 12 layers, 8 experts every second block, 32 x 1024 tokens): MFU in bf16
#    autocast, attention blocks compiled (the MoE layer's data-dependent shapes stay eager)
timeout 75 "$PY" benchmarks/train.py --device cuda --preset small --precision bf16 --rounds 2 --steps 3 \
  --variants switch,dts-sparse --compile --fused-adamw --peak-tflops "$PEAK" --out bench_results/train-small-cuda.json
