#!/bin/bash
# One device call (H100/H200) for the Gluon kernel: probe + tuned entries, GPU tests, gemm table with eager column.
#   bash benchmarks/gluon_device_run.sh OUT
# Writes OUT/gluon_probe.log, OUT/tuned_configs.json (this GPU's Gluon entries merged), OUT/pytest.txt, OUT/gemm.txt.
OUT=${1:?usage: gluon_device_run.sh OUT}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
timeout ${PROBE_S:-260} python3 benchmarks/gluon_probe.py --out "$OUT" --ms 1,16 --formats tq2,tq1 --splits ${SPLITS:-1,4,8} \
    --eager 2>&1 | grep -v "  gluon"
echo "probe: $(grep -c 'WRONG\|FAILED' "$OUT/gluon_probe.log") wrong/failed variants"
grep 'WRONG\|FAILED' "$OUT/gluon_probe.log" | head -5
python3 benchmarks/gluon_table.py "$OUT/gluon_probe.log" --write | tail -3
cp spectra/kernels/tuned_configs.json "$OUT/"
timeout ${TEST_S:-150} python3 -m pytest -q -x -m gpu tests/test_gluon_kernel.py tests/test_kernel_plans.py \
    tests/test_kernels.py -k "gluon or many_shapes or cuda_graph or split_k" 2>&1 | tail -15 | tee "$OUT/pytest.txt"
timeout ${GEMM_S:-170} python3 -m spectra bench gemm --formats tq2,tq2:tl,tq1,tq1:tl --ms ${GEMM_MS:-1,16,64,256} \
    --eager --reps 100 --trials 3 2>&1 | tee "$OUT/gemm.txt"
