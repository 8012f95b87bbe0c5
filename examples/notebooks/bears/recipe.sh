#!/usr/bin/env bash
# Bears, 5 classes, 150 px: a simple CNN against a frozen VGG16, side by side.
#
#   recipe.sh DATA OUT [TRAINING FLAGS...]
#
# DATA: train/, val/ and test/ folders of class sub-folders. TRAINING FLAGS are added to the training
# commands (e.g. --device cuda; the tests shrink the runs with --image-size 32 --epochs 1 --no-pretrained).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$1" out="$2"
shift 2

# notebook: cnn.fit(train_gen, validation_data=val_gen); cnn.save('cnn.h5')
imgclf train "$data" --config "$here/cnn.yaml" --out "$out/cnn" "$@"
# notebook: vgg.fit(train_gen, validation_data=val_gen); vgg.save('vgg16.h5')
imgclf train "$data" --config "$here/vgg16.yaml" --out "$out/vgg16" "$@"

# notebook: classification_report(..., output_dict=True)['weighted avg'] and confusion_matrix per model,
# side by side: compare.csv/compare.html (weighted precision, recall, F1 on val and test, parameters,
# time) and each run's plots/confusion_test.png
imgclf compare "$out/cnn" "$out/vgg16" --out "$out/compare"

# notebook: model = load_model('cnn.h5'); model.predict(test_gen) -> per-file predictions next to the
# true labels (taken from test/'s class sub-folders)
imgclf predict "$out/cnn" "$data/test" --out "$out/cnn_test_predictions.csv"
imgclf predict "$out/vgg16" "$data/test" --out "$out/vgg16_test_predictions.csv"
