"""The candidates the default ``imgclf train DATA`` (no ``--model``) tries, cheapest first.

1. ``linear probe``: logistic regression on frozen EfficientNet-Lite0 ImageNet features (seconds;
   wins on small sets that look like photos).
2. ``small CNN``: ``simple_cnn`` trained from scratch at 64 px (wins on small, uniform images
   such as cell crops, where ImageNet features carry little).
3. ``fine-tuned EfficientNet-Lite0``: the pretrained backbone with the staged transfer recipe (a
   head on frozen features, then a low-lr fine-tune with BatchNorm frozen); its head stage caches
   2 augmented views per image, not 5, unless ``--feature-views`` says otherwise.

Each candidate is the user's config (data, augmentation, seed, epochs...) with only the model
changed, so every explicit setting applies to all of them. One default differs: unless
``--class-weight`` or ``--sampler`` is given, the candidates weigh classes 'balanced'. Measured by
``benchmarks/imbalance.py`` (imbalanced Fashion-MNIST, 150/60/30/12/4 training images, 3 seeds),
test macro-F1 without -> with balanced weights: linear probe 0.611 -> 0.697, small CNN 0.555 ->
0.715, fine-tuned Lite0 0.657 -> 0.718, and the 4-image class went from never predicted (recall 0)
to recall 0.33-0.67; class-balanced sampling was no better (0.709, 0.646). On balanced classes
the weights are all 1, so nothing changes. Lite0's weights ship offline with
imgclf, so no candidate needs the network.

Input size, unless ``--image-size`` is given: the small CNN keeps its 64 px; the two pretrained
candidates read the images near their own resolution, between 96 px (below that ImageNet features
fade) and Lite0's native 224 px: the median short side of up to 64 training images, rounded up to a
multiple of 32. A 28 px Fashion-MNIST set trains at 96 px, about 5x faster than at 224 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.config import Config, build_config
from imgclf.data.images import BadImage, image_size, require_regular_file

PRETRAINED = "tf_efficientnet_lite0"
PROBE_CANDIDATE = "linear probe"
CANDIDATES: dict[str, dict] = {
    PROBE_CANDIDATE: {"name": PRETRAINED, "pretrained": True, "head": "logreg"},
    "small CNN": {},
    "fine-tuned EfficientNet-Lite0": {"name": PRETRAINED, "pretrained": True},
}
FINETUNE_CANDIDATE = "fine-tuned EfficientNet-Lite0"
FINETUNE_VIEWS = 2  # augmented views its head stage caches (not 5): extracting them is most of its cost
SLUGS = {"linear probe": "probe", "small CNN": "small_cnn", "fine-tuned EfficientNet-Lite0": "finetune"}


MIN_PRETRAINED_SIZE, MAX_PRETRAINED_SIZE, SIZE_SAMPLE = 96, 224, 64


def candidate_config(base: Config, name: str, out: Path, pretrained_size: int | None = None) -> Config:
    """``base`` with the model of candidate ``name``, writing to ``out``; ``pretrained_size`` is the
    pretrained candidates' input size when the user gave none."""
    values = base.model_dump()
    values["train"] = base.train.model_dump(exclude_unset=True)  # what was typed stays typed (--lr 0.001)
    values["model"] = dict(CANDIDATES[name])
    values["out"] = str(out)
    if CANDIDATES[name] and base.data.image_size is None and pretrained_size:
        values["data"]["image_size"] = pretrained_size
    if weighs_balanced(base):
        values["train"]["class_weight"] = "balanced"
    if name == FINETUNE_CANDIDATE and base.train.feature_views is None:
        values["train"]["feature_views"] = FINETUNE_VIEWS
    return build_config(values)


def weighs_balanced(config: Config) -> bool:
    """Whether the candidates take the measured 'balanced' class weights: the user chose no imbalance handling."""
    return not {"class_weight", "sampler"} & config.train.model_fields_set


def pretrained_input_size(paths: list[Path]) -> int:
    """The pretrained candidates' input size for these images (see the module docstring)."""
    sides = []
    for path in paths[:: max(1, len(paths) // SIZE_SAMPLE)][:SIZE_SAMPLE]:
        try:
            require_regular_file(path)
            sides.append(min(image_size(path)))  # the header alone: a DICOM file is not decoded for it
        except (OSError, ValueError, BadImage, Image.DecompressionBombError, NotImplementedError):
            continue  # the decode reports unreadable images, with their names
    if not sides:
        return MAX_PRETRAINED_SIZE
    side = int(np.median(sides))
    return int(min(MAX_PRETRAINED_SIZE, max(MIN_PRETRAINED_SIZE, -(-side // 32) * 32)))


def is_default_request(config: Config) -> bool:
    """True when nothing about the network was chosen: no model setting, no stages, no start run.

    Only fields given explicitly count (pydantic's ``model_fields_set``): a config file or a flag
    that names any model setting trains exactly that, as before.
    """
    return not (config.model.model_fields_set or config.stages or config.train.init_from
                or "model" in config.model_fields_set)
