#!/usr/bin/env bash
# Train the bundled demo checkpoints on CIFAR-10, a group at a time (each group fits one 10-minute
# GPU command on an H100; on CPU expect hours per model).
#
#   scripts/train_zoo.sh DATA_DIR OUT_DIR GROUP [LOG_DIR]
#
# GROUP: vits (teacher, then plain and distilled ViT together), convs (FCViT, Conv2Former),
#        hybrids (Mobile-Former, MOAT), cetnet (CE depth 1/3/5/7), or all.
# Epochs are fixed per family (no wall-clock shortening) so models that are compared, the two ViTs
# and the four CETNet depths, get the same recipe and budget. At most three jobs share the GPU:
# measured on an H100, eleven concurrent small-model jobs time-slice so badly that the slowest
# ran at 350 img/s, while three ran at their solo speed (ResNet-10 40k, Conv2Former 10k,
# Mobile-Former 5k img/s).
set -euo pipefail
data=$1 out=$2 group=$3 logs=${4:-$2}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out" "$logs"
common=(--data "$data" --out "$out" --weight-decay 0.05 --warmup-epochs 2 --label-smoothing 0.1
        --seed 0 --eval-every 5 --clip-grad 1.0)
run() {  # checkpoint-id model [extra args...]
  local id=$1 model=$2; shift 2
  "$py" "$here/scripts/train.py" --model "$model" --checkpoint-id "$id" "${common[@]}" "$@" \
    >"$logs/$id.log" 2>&1 || echo "FAILED $id (see $logs/$id.log)"
  tail -n 1 "$logs/$id.log"
}
vit=(--epochs 60 --batch-size 512 --lr 1e-3 --random-erasing 0.25)
conv=(--epochs 25 --batch-size 512 --lr 2e-3)

# Decode the JPEGs once (train.py caches the decoded arrays beside the data) before the fan-out.
"$py" "$here/scripts/train.py" --model resnet_cifar --data "$data" --smoke --max-steps 1 >"$logs/decode.log" 2>&1

group_vits() {
  run resnet_cifar resnet_cifar --epochs 15 --batch-size 512 --lr 2e-3
  run vit_cifar vit_cifar "${vit[@]}" &
  run deit_cifar_distilled deit_cifar_distilled "${vit[@]}" \
    --teacher "$out/resnet_cifar.safetensors" --distill hard &
  wait
}
group_convs() { run fcvit_cifar fcvit_cifar "${conv[@]}" & run conv2former_cifar conv2former_cifar "${conv[@]}" & wait; }
group_hybrids() { run mobile_former_cifar mobile_former_cifar "${conv[@]}" & run moat_cifar moat_cifar "${conv[@]}" & wait; }
group_cetnet() {
  for depth in 1 3 5 7; do
    run "cetnet_cifar_ce$depth" cetnet_cifar --model-kwargs "{\"ce_depth\": $depth}" "${conv[@]}" &
    if [ "$depth" = 3 ]; then wait; fi  # two at a time
  done
  wait
}
case $group in
  vits|convs|hybrids|cetnet) "group_$group" ;;
  all) group_vits; group_convs; group_hybrids; group_cetnet ;;
  *) echo "unknown group '$group' (vits, convs, hybrids, cetnet, all)" >&2; exit 2 ;;
esac
