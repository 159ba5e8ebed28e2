#!/usr/bin/env bash
# Train every bundled demo checkpoint on CIFAR-10, all at once on one GPU (or, slowly, on CPU).
#
#   scripts/train_zoo.sh DATA_DIR OUT_DIR MINUTES [LOG_DIR]
#
# DATA_DIR holds CIFAR-10-images/{train,test}; every job gets the same wall-clock budget MINUTES
# (train.py shortens its cosine schedule to fit), the teacher and distilled ViT share one lane.
# The four CETNet CE depths use one recipe and one fixed epoch budget, so the receptive-field page
# compares like with like.
set -euo pipefail
data=$1 out=$2 minutes=$3 logs=${4:-$out}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out" "$logs"
common=(--data "$data" --out "$out" --batch-size 1024 --weight-decay 0.05 --warmup-epochs 3
        --label-smoothing 0.1 --seed 0)
run() {  # checkpoint-id minutes model [extra args...]
  local id=$1 limit=$2 model=$3; shift 3
  "$py" "$here/scripts/train.py" --model "$model" --checkpoint-id "$id" --time-limit-min "$limit" \
    "${common[@]}" "$@" >"$logs/$id.log" 2>&1 || echo "FAILED $id (see $logs/$id.log)"
}

# Decode the JPEGs once (train.py caches the decoded arrays beside the data) before the fan-out.
"$py" "$here/scripts/train.py" --model resnet_cifar --data "$data" --smoke --max-steps 1 >"$logs/decode.log" 2>&1

vit=(--epochs 50 --batch-size 512 --lr 1e-3 --random-erasing 0.25 --clip-grad 1.0)
hybrid=(--epochs 60 --lr 2e-3 --clip-grad 1.0)
cet=(--epochs 40 --lr 2e-3 --clip-grad 1.0)
# The plain and the distilled ViT start together once the teacher is done, with the same recipe,
# epochs and wall-clock budget, so the attention page compares like with like.
lane_vits() {
  run resnet_cifar "$(awk "BEGIN{print $minutes*0.28}")" resnet_cifar --epochs 30 --lr 2e-3
  local vit_minutes; vit_minutes=$(awk "BEGIN{print $minutes*0.7}")
  run vit_cifar "$vit_minutes" vit_cifar "${vit[@]}" &
  run deit_cifar_distilled "$vit_minutes" deit_cifar_distilled "${vit[@]}" \
    --teacher "$out/resnet_cifar.safetensors" --distill hard &
  wait
}
lane_vits &
run fcvit_cifar "$minutes" fcvit_cifar "${hybrid[@]}" &
run mobile_former_cifar "$minutes" mobile_former_cifar "${hybrid[@]}" &
run moat_cifar "$minutes" moat_cifar "${hybrid[@]}" &
run conv2former_cifar "$minutes" conv2former_cifar "${hybrid[@]}" &
for depth in 1 3 5 7; do
  run "cetnet_cifar_ce$depth" "$minutes" cetnet_cifar --model-kwargs "{\"ce_depth\": $depth}" "${cet[@]}" &
done
wait
grep -h '"test_accuracy"' "$out"/*.json || true
