#!/bin/bash
# One device call (H100/H200, <= 10 minutes): the decode-attention GPU tests, the probes beside the library, the
# int8-cache decode step at context 8192, and where the budget is left the prefill's host profile.
#   bash benchmarks/probes_device_run.sh OUT [BUDGET_SECONDS]
# Each step writes OUT/<step>.txt and gets at most what is left of the budget (default 560 s).
OUT=${1:?usage: probes_device_run.sh OUT [BUDGET_SECONDS]}
BUDGET=${2:-560}
source "$(dirname "$0")/device_steps.sh"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
TAIL=8 step gpu_tests 170 python3 -m pytest -q -m gpu tests/test_prefill_kernel.py tests/test_decode_attention.py tests/test_generate.py
TAIL=12 step fused_mlp 100 python3 benchmarks/fused_mlp_probe.py --bj 8,16 --trials 3
TAIL=6 step sliced_dequant 90 python3 benchmarks/prefill_sliced_dequant_probe.py --trials 3
TAIL=12 step decode_int8 150 python3 benchmarks/bench_decode_paths.py --kinds float,tq2 --batches 1 --modes eager \
    --long-contexts 8192 --int8-cache
TAIL=60 step prefill_profile 90 python3 benchmarks/bench_prefill.py --prompts 128,2048 --kinds float,tq2 --profile \
    --trials 3
echo "done in $(( $(date +%s) - START )) s"
