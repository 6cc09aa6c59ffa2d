#!/usr/bin/env bash
# Reproduce the heads shipped in specplug/heads/weights/ (docs/drafters.md has the reports):
#   bash scripts/train_heads.sh                 # every shipped head
#   MODELS=smollm2-135m KINDS=eagle bash scripts/train_heads.sh
# Each head trains into $WORK/<model>-<kind> (resumable), then its checkpoint and report are
# copied into the package. The generated training data is cached per target and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-heads-work}
MODELS=${MODELS:-"smollm2-135m gemma3-270m"}
KINDS=${KINDS:-"eagle clover"}
for model in $MODELS; do
  for kind in $KINDS; do
    out="$WORK/$model-$kind"
    specplug train --model "$model" --drafter "$kind" --expand 100 --max-new-tokens 160 --epochs 12 \
      --out "$out"
    dest="specplug/heads/weights/$model/$kind"
    mkdir -p "$dest"
    cp "$out/config.json" "$out/model.safetensors" "$out/report.md" "$out/report.json" "$dest/"
  done
done
