#!/usr/bin/env bash
# Blood cells, 4 classes, 150 px: the notebook's models as imgclf commands.
#
#   recipe.sh DATA OUT [TRAINING FLAGS...]
#
# DATA: train/ and test/ folders of class sub-folders (val/ too, or a stratified share of train).
# TRAINING FLAGS are added to every training command (e.g. --device cuda; the tests shrink the runs
# with --image-size 94 --epochs 1 --no-pretrained).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$1" out="$2"
shift 2

# notebook: the CNN compiled with each optimizer pair and fitted, one after another
# (leaderboard.csv compares them; every trial is a full run under trials/, on one shared split)
imgclf grid "$data" --config "$here/cnn.yaml" --grid "$here/optimizers.yaml" --out "$out/cnn_optimizers" "$@"
cnns=("$out"/cnn_optimizers/trials/trial_*)
best_cnn="$out/cnn_optimizers/trials/$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["best_trial"])' \
  "$out/cnn_optimizers/best.json")"

# notebook: the soft-vote ensemble: np.mean([m.predict(test_gen) for m in models], axis=0).argmax(1)
imgclf ensemble "${cnns[@]}" --method soft --out "$out/cnn_ensemble"

# notebook: features = Model(cnn.input, cnn.layers[-2].output).predict(...); SVC().fit(features, labels)
# (SVC(): C=1 on the raw features, so --head-param 1 --no-head-scale; imgclf: its probabilities come from
# Platt scaling on cross-validated decision values, which SVC() without probability=True does not have)
imgclf train "$data" --config "$here/cnn.yaml" --head svm --head-param 1 --no-head-scale --init-from "$best_cnn" \
  --out "$out/cnn_svm" "$@"

# notebook: the hybrid CNN trained, then its 100-unit dense layer's output fed to an SVC
imgclf train "$data" --config "$here/hybrid.yaml" --out "$out/hybrid" "$@"
imgclf train "$data" --config "$here/hybrid.yaml" --head svm --head-param 1 --no-head-scale --init-from "$out/hybrid" \
  --out "$out/hybrid_svm" "$@"

# notebook: VGG16 frozen, then block5 unfrozen at RMSprop 1e-5
imgclf train "$data" --config "$here/vgg16.yaml" --out "$out/vgg16" "$@"

# notebook: Model(inputs=vgg.input, outputs=[vgg.get_layer(n).output for n in ('block1_conv1', 'block3_conv1')])
# and the feature maps of one image plotted
first_image="$(find "$data/test" -type f | sort | head -n 1)"
imgclf explain "$out/vgg16" "$first_image" --feature-maps --layers block1_conv1,block3_conv1 --out "$out/vgg16_maps"

# notebook: the models' accuracies and reports side by side
imgclf compare "${cnns[@]}" "$out/cnn_ensemble" "$out/cnn_svm" "$out/hybrid" "$out/hybrid_svm" "$out/vgg16" \
  --out "$out/compare"
