#!/usr/bin/env bash
# COVID vs no-COVID, binary grayscale CNN: the notebook's steps as imgclf commands.
#
#   recipe.sh DATA UNLABELED OUT [TRAINING FLAGS...]
#
# DATA: train/ and val/ (and test/) folders of class sub-folders; UNLABELED: a folder of images
# without labels. TRAINING FLAGS are added to the training commands (e.g. --device cuda; the tests
# shrink the runs with --image-size 190 --epochs 1).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$1" unlabeled="$2" out="$3"
shift 3

# notebook: model.fit(train_gen, validation_data=val_gen, callbacks=[EarlyStopping(min_delta=0.01)])
# notebook: f1_score(...) and confusion_matrix(...): metrics.json and plots/confusion_val.png
imgclf train "$data" --config "$here/cnn.yaml" --out "$out/cnn" "$@"

# notebook: model.predict(unlabeled_gen) -> a CSV of file names and predicted classes
imgclf predict "$out/cnn" "$unlabeled" --out "$out/unlabeled_predictions.csv"

# notebook: the architecture variants, trained one after another and compared (leaderboard.csv)
imgclf grid "$data" --config "$here/cnn.yaml" --grid "$here/variants.yaml" --rank-by val_f1_macro \
  --out "$out/variants" "$@"
