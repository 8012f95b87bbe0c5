#!/usr/bin/env bash
# Glaucoma, binary, 224 px, EfficientNet-B0: model 1 grid -> model 2 (loads model 1) grid -> model 3
# (loads model 2) -> Fold0..Fold9 cross-validation of the chain.
#
#   recipe.sh FOLDS OUT [TRAINING FLAGS...]
#
# FOLDS: Fold0..Fold9, each with train/, valid/ and test/ folders of class sub-folders; the grids
# tune on Fold0. TRAINING FLAGS are added to every training command (e.g. --device cuda; the tests
# shrink the runs with --image-size 32 --epochs 1 --no-pretrained and smaller grids).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
folds="$1" out="$2"
shift 2
data="$folds/Fold0"
best_trial() {  # the trial directory that best.json names
  echo "$1/trials/$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["best_trial"])' "$1/best.json")"
}

# notebook: model 1 (base frozen) over optimizer x lr x batch x epochs, ranked by F1 then accuracy, with times
imgclf grid "$data" --config "$here/model1.yaml" --grid "$here/grid_model1.yaml" --rank-by f1_macro,accuracy \
  --out "$out/model1_grid" "$@"
model1="$(best_trial "$out/model1_grid")"

# notebook: model 2 = load_model(model 1); the last 20 layers but BatchNormalization trainable; its own grid
imgclf grid "$data" --config "$here/model2.yaml" --init-from "$model1" --grid "$here/grid_model2.yaml" \
  --rank-by f1_macro,accuracy --out "$out/model2_grid" "$@"
model2="$(best_trial "$out/model2_grid")"

# notebook: model 3 = load_model(model 2); everything trainable at batch 16
imgclf train "$data" --config "$here/model3.yaml" --init-from "$model2" --out "$out/model3" "$@"

# notebook: Fold0..Fold9 of the final chain, then pd.DataFrame(results).describe() (time included);
# stages model1 and model2 take their grid's winning settings from its best.json
imgclf cv "$folds" --config "$here/chain_cv.yaml" --from-grid "model1=$out/model1_grid" \
  --from-grid "model2=$out/model2_grid" --out "$out/cv" "$@"
