#!/bin/bash
# The fused decode step on a GPU (H100/H200), in device calls of <= 10 minutes each:
#   bash benchmarks/fused_decode_device_run.sh OUT 1   # fused-product GPU tests, then fused vs separate kernels
#   bash benchmarks/fused_decode_device_run.sh OUT 2   # the GPU tests of the kernels the fused epilogue touched
#   bash benchmarks/fused_decode_device_run.sh OUT 3   # the decode-path GPU tests
# Each step writes OUT/<step>.txt and gets at most what is left of the budget (third argument, default 560 s).
# If part 1's tests pass and its table shows the fused step faster, set kernels.FUSED_DECODE_VERIFIED_ON_GPU.
OUT=${1:?usage: fused_decode_device_run.sh OUT PART [BUDGET_SECONDS]}
PART=${2:?part 1, 2 or 3}
BUDGET=${3:-560}
source "$(dirname "$0")/device_steps.sh"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case $PART in
1)
  TAIL=12 step fused_tests 300 python3 -m pytest -q -m gpu tests/test_fused_decode.py
  TAIL=30 step fused_ab 250 python3 benchmarks/bench_fused_decode.py --kinds tq2,tq1 --batches 1,16 --repeats 3 \
      --variants fused,unfused,fused+nogluon,nogluon,norm+swiglu
  ;;
2)
  TAIL=8 step kernel_tests 540 python3 -m pytest -q -m gpu tests/test_gemv_kernel.py tests/test_gluon_kernel.py \
      tests/test_kernel_plans.py tests/test_kernels.py
  ;;
3)
  TAIL=8 step decode_tests 540 python3 -m pytest -q -m gpu tests/test_generate.py tests/test_generate_default_path.py \
      tests/test_pointwise_kernels.py tests/test_decode_attention.py tests/test_prefill_kernel.py \
      tests/test_ternarize_kernel.py
  ;;
esac
echo "done in $(( $(date +%s) - START )) s"
