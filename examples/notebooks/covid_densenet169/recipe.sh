#!/usr/bin/env bash
# COVID X-ray, 3 classes, DenseNet169 (conv5 trainable): the notebook's steps as imgclf commands.
#
#   recipe.sh DATA OUT [TRAINING FLAGS...]
#
# DATA: train/ and val/ folders of class sub-folders (a test/ folder is used when present).
# OUT: where the run goes. TRAINING FLAGS are added to the training command (e.g. --device cuda;
# the tests shrink the run with --image-size 32 --epochs 1 --no-pretrained).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$1" out="$2"
shift 2

# notebook: model.fit(train_gen, validation_data=val_gen, callbacks=[early_stopping], class_weight=...)
# It also writes what the notebook plots and prints afterwards: plots/curves.png (loss, accuracy,
# recall... per epoch, train and val), and for val (and test) plots/confusion_val.png and the
# classification report in metrics.json and report.html.
imgclf train "$data" --config "$here/densenet169.yaml" --out "$out/densenet169" "$@"

# notebook: confusion_matrix(...) and classification_report(...) on the training generator
imgclf evaluate "$out/densenet169" --split train
