#!/bin/bash
# python -m bench.own_model on a GPU lent for minutes (the workplace's `device` tool), one process per victim.
# Once, here: .devdata/own.tgz holds caltech101 resized to 64 px and a Tiny ImageNet subset (val 5,000, train 50
# per class), about 36 MB (a call carries at most 64 MiB); see bench/own_model.py. Then one device call:
# command `bash bench/device_own_model.sh`, carry [".devdata"], timeout_s 590. ARCHS picks the victims; OWN_SETS
# passes protect settings, e.g. OWN_SETS="--set head.steps=2000 --set head.hidden=1024".
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HONEYPOTNET_CACHE=/tmp/hpcache
set -o pipefail
T0=$(date +%s)
mkdir -p /tmp/d && tar xzf .devdata/own.tgz -C /tmp/d || exit 3
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" || exit 3
ROOTS="--caltech-root /tmp/d/caltech101 --tin-root /tmp/d/tiny-imagenet-200"
if [ -z "$SKIP_QUICK" ]; then  # the whole chain at the smoke size first: a bug shows in a minute, not ten
  python3 -m bench.own_model --quick --device cuda $ROOTS --archs torchvision:mobilenet_v3_small --out /tmp/q \
    > $OUT/quick.log 2>&1 || { tail -30 $OUT/quick.log; cat /tmp/q/*/log.txt | tail -30; exit 4; }
  echo "quick ok in $(( $(date +%s) - T0 )) s"
fi
i=0
for arch in ${ARCHS:-torchvision:mobilenet_v3_small torchvision:resnet18}; do
  OMP_NUM_THREADS=8 python3 -m bench.own_model --device cuda $ROOTS --archs $arch $OWN_SETS --out /tmp/own$i > /tmp/own$i.log 2>&1 &
  pids="$pids $!"; i=$((i+1))
done
wait $pids
for j in $(seq 0 $((i-1))); do
  cp /tmp/own$j/own_model.json $OUT/own$j.json 2>/dev/null || { echo "run $j wrote no JSON"; tail -20 /tmp/own$j.log; }
  cat /tmp/own$j/*/log.txt > $OUT/own$j-log.txt 2>/dev/null
  cat /tmp/own$j/own_model.md 2>/dev/null
done
echo "total $(( $(date +%s) - T0 )) s"
