#!/usr/bin/env bash
# Second training stage of the bundled checkpoints on a 2-core CPU: continue each model from its
# first-stage (GPU) checkpoint with train.py --init, two single-thread jobs at a time.
#
#   scripts/finish_zoo_cpu.sh DATA_DIR STAGE1_DIR OUT_DIR GROUP [LOG_DIR]
#
# GROUP: convs (Conv2Former + Mobile-Former, 5 epochs fitted to 55 min; then a third Conv2Former
#        stage, 2 epochs fitted to 45 min, into OUT_DIR/stage3), cetnet (CE depth 1/3/5/7,
#        2 epochs each, the same for every depth), vits (plain and distilled ViT, the same 1 epoch;
#        the distilled one learns from STAGE1_DIR/resnet_cifar), or all.
# Why a second stage: on this CPU one epoch of these models takes 11-21 min single-threaded
# (measured: 60-75 img/s training), so a from-scratch run to the targets does not fit a work session,
# while a GPU session trains the first stage in minutes (scripts/train_zoo.sh).
# Batch 128 (not 512 as on the GPU): on CPU the cost is per image, and four times the optimiser
# steps per epoch converge faster.
set -euo pipefail
data=$1 stage1=$2 out=$3 group=$4 logs=${5:-$3}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out" "$logs"
common=(--data "$data" --out "$out" --threads 1 --batch-size 128 --weight-decay 0.05 --label-smoothing 0.1
        --seed 0 --eval-every 100)
run() {  # checkpoint-id model [extra args...]; starts from $stage1 (or $from)/<id>
  local id=$1 model=$2; shift 2
  local log="$logs/$id${log_suffix:-}.log"
  "$py" "$here/scripts/train.py" --model "$model" --checkpoint-id "$id" --init "${from:-$stage1}/$id.safetensors" \
    "${common[@]}" "$@" >"$log" 2>&1 || echo "FAILED $id (see $log)"
  tail -n 1 "$log"
}
group_convs() {
  for id in conv2former_cifar mobile_former_cifar; do
    run "$id" "$id" --epochs 5 --time-limit-min 55 --lr 1e-3 --warmup-epochs 0.25 &
  done
  wait
  # Conv2Former ended at 72% (below the 75% target): a third stage at half the LR, another data order.
  from=$out log_suffix=_stage3 run conv2former_cifar conv2former_cifar --out "$out/stage3" --epochs 2 \
    --time-limit-min 45 --lr 5e-4 --warmup-epochs 0.1 --seed 1
}
group_cetnet() {
  for depth in 1 3 5 7; do
    run "cetnet_cifar_ce$depth" cetnet_cifar --model-kwargs "{\"ce_depth\": $depth}" \
      --epochs 2 --lr 1e-3 --warmup-epochs 0.25 --clip-grad 1.0 &
    if [ "$depth" = 3 ]; then wait; fi  # two at a time: one per core
  done
  wait
}
group_vits() {
  vit=(--epochs 1 --lr 5e-4 --warmup-epochs 0.1 --random-erasing 0.25 --clip-grad 1.0)
  run vit_cifar vit_cifar "${vit[@]}" &
  run deit_cifar_distilled deit_cifar_distilled "${vit[@]}" --teacher "$stage1/resnet_cifar.safetensors" \
    --distill hard &
  wait
}
case $group in
  convs|cetnet|vits) "group_$group" ;;
  all) group_convs; group_cetnet; group_vits ;;
  *) echo "unknown group '$group' (convs, cetnet, vits, all)" >&2; exit 2 ;;
esac
