#!/bin/bash
# bench/robustness.py on a GPU lent for minutes (the workplace's `device` tool), CPU protocol.
#
# Once, here: put the data where it travels with the working tree (.devdata/ is git-ignored through
# .git/info/exclude; about 59 MB, under the 64 MiB a call carries):
#   echo /.devdata/ >> .git/info/exclude
#   mkdir -p .devdata/data .devdata/weights/resnet-cifar10
#   cp ../shared/data/*.tar.gz .devdata/data/ && cp ../shared/weights/resnet-cifar10/resnet20-*.th .devdata/weights/resnet-cifar10/
# Then one device call: command `bash bench/device_robustness.sh`, carry [".devdata"], timeout_s 570.
# VARIANTS, SEEDS and DEADLINE (seconds of the full run, after a ~45 s quick smoke test) override the
# defaults. Units live in /tmp/rep on the machine: a second call on the still-warm machine resumes them
# (SKIP_QUICK=1). Used on 2026-11-26: two calls on one H200, about 2.5 min per variant and seed
# (negcr0.25-eps24, before the 5k thief also trained 24 and 48 epochs, and before -ft2 was the default here).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HONEYPOTNET_CACHE=/tmp/hpcache
VARIANTS=${VARIANTS:-negcr0.25-eps24-ft2} SEEDS=${SEEDS:-0 1 2} DEADLINE=${DEADLINE:-380}
set -o pipefail
nvidia-smi -L
python3 -c "import torch, safetensors, matplotlib, tqdm; print(torch.__version__, torch.cuda.get_device_name())" || exit 3
T0=$(date +%s)
if [ -z "$SKIP_QUICK" ]; then  # the CUDA code path end to end on the quick protocol, before minutes are spent
  python3 bench/robustness.py --quick --device cuda --shared .devdata --reproduce-out /tmp/rq --out /tmp/rqo \
    --no-progress --cross-substitute cnn_small --variants ${VARIANTS%% *} > $OUT/quick.log 2>&1 || { tail -40 $OUT/quick.log; exit 4; }
  echo "quick ok in $(( $(date +%s) - T0 )) s"
fi
python3 bench/robustness.py --device cuda --shared .devdata --reproduce-out /tmp/rep --out $OUT/rob --no-progress \
  --variants $VARIANTS --seeds $SEEDS --deadline $DEADLINE 2>&1 | tee $OUT/rob.log \
  | grep -vE "^\|" | tail -60
echo "total $(( $(date +%s) - T0 )) s"
