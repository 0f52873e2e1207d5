#!/usr/bin/env bash
# All benchmarks, one after the other (run them on an otherwise idle machine), then BENCHMARKS.md from their outputs.
# Needs the bench extra for the side-by-side comparison: pip install -e ".[dev,bench]" (torchinfo, fvcore, ptflops, deepspeed).
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/hook_overhead.py --rounds 100
python bench/cost_summary_time.py --rounds 5
python bench/compare_tools.py
python bench/accuracy_vs_profiler.py
python bench/callback_overhead.py --batches 130
python bench/memory_gpu.py --cpu-timing
python bench/memory_corpus.py
python bench/memory_alloc.py
python bench/plan_time.py --rounds 3
python bench/ranks_check.py 2 4
python bench/comm_check.py 5
if python -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then bash bench/gpu_check.sh --out bench/out; fi
python bench/report.py
