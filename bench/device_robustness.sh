#!/bin/bash
# python -m bench.robustness on a GPU lent for minutes (the workplace's `device` tool), CPU protocol.
#
# Once, here: put the data where it travels with the working tree (.devdata/ is git-ignored through
# .git/info/exclude; about 59 MB, under the 64 MiB a call carries):
#   echo /.devdata/ >> .git/info/exclude
#   mkdir -p .devdata/data .devdata/weights/resnet-cifar10
#   cp ../shared/data/*.tar.gz .devdata/data/ && cp ../shared/weights/resnet-cifar10/resnet20-*.th .devdata/weights/resnet-cifar10/
# Then one device call: command `bash bench/device_robustness.sh`, carry [".devdata"], timeout_s 590.
# VARIANTS, SEEDS and DEADLINE (seconds of each run) override the defaults. SKIP_QUICK=1 skips the
# ~45 s quick smoke test (protect comes first in each seed, so a CUDA bug there shows in seconds anyway).
# PARALLEL=1: one process per seed, all on the one GPU (small models leave most of it idle), each with
# its own units directory /tmp/rep<seed>; ARGS_<seed> adds options to that seed's run (ARGS_0=--no-goals),
# COMMON to every run (COMMON=--quick DEVICE=cpu tries the script without a GPU).
# Each writes rob-s<seed>.json and .log under $OUT (at most 8 files come back); merge them here with
# `python -m bench.robustness --merge A.json B.json ... --out DIR`.
# Used on 2026-11-26 (session 6, sequential, negcr0.25-eps24: ~2.5 min per variant and seed on an H200)
# and 2026-11-26 (session 8, PARALLEL=1, negcr0.25-eps24-ft2; docs/results/robustness/ has the runs).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HONEYPOTNET_CACHE=/tmp/hpcache
VARIANTS=${VARIANTS:-negcr0.25-eps24-ft2} SEEDS=${SEEDS:-0 1 2} DEADLINE=${DEADLINE:-380}
set -o pipefail
if [ "${DEVICE:-cuda}" = cuda ]; then
  nvidia-smi -L
  python3 -c "import torch, safetensors, matplotlib, tqdm; print(torch.__version__, torch.cuda.get_device_name())" || exit 3
fi
T0=$(date +%s)
if [ -z "$SKIP_QUICK" ]; then  # the CUDA code path end to end on the quick protocol, before minutes are spent
  python3 -m bench.robustness --quick --device cuda --shared .devdata --reproduce-out /tmp/rq --out /tmp/rqo \
    --no-progress --cross-substitute cnn_small --variants ${VARIANTS%% *} > $OUT/quick.log 2>&1 || { tail -40 $OUT/quick.log; exit 4; }
  echo "quick ok in $(( $(date +%s) - T0 )) s"
fi
if [ -n "$PARALLEL" ]; then
  n=$(echo $SEEDS | wc -w)
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 30 > $OUT/gpu.log 2>&1 &
  smi=$!
  for s in $SEEDS; do
    extra=$(eval echo "\${ARGS_$s:-}")
    OMP_NUM_THREADS=$(( $(nproc) / n )) python3 -m bench.robustness --device ${DEVICE:-cuda} --shared .devdata \
      --reproduce-out /tmp/rep$s --out /tmp/rob$s --no-progress --variants $VARIANTS --seeds $s \
      --deadline $DEADLINE $COMMON $extra > $OUT/rob-s$s.log 2>&1 &
    pids="$pids $!"
  done
  wait $pids
  kill $smi 2>/dev/null
  for s in $SEEDS; do
    cp /tmp/rob$s/robustness.json $OUT/rob-s$s.json 2>/dev/null || echo "seed $s wrote no JSON"
    echo "== seed $s"; grep -E "protect |deadline|stopped by|Error|wrote" $OUT/rob-s$s.log | tail -8
  done
else
  python3 -m bench.robustness --device cuda --shared .devdata --reproduce-out /tmp/rep --out $OUT/rob --no-progress \
    --variants $VARIANTS --seeds $SEEDS --deadline $DEADLINE 2>&1 | tee $OUT/rob.log \
    | grep -vE "^\|" | tail -60
fi
echo "total $(( $(date +%s) - T0 )) s"
