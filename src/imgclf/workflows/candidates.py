"""The candidates the default ``imgclf train DATA`` (no ``--model``) tries, cheapest first.

1. ``linear probe``: logistic regression on frozen EfficientNet-Lite0 ImageNet features (seconds;
   wins on small sets that look like photos).
2. ``small CNN``: ``simple_cnn`` trained from scratch at 64 px (wins on small, uniform images
   such as cell crops, where ImageNet features carry little).
3. ``fine-tuned EfficientNet-Lite0``: the pretrained backbone with the staged transfer recipe (a
   head on frozen features, then a low-lr fine-tune with BatchNorm frozen).

Each candidate is the user's config (data, augmentation, seed, epochs...) with only the model
changed, so every explicit setting applies to all of them. Lite0's weights ship offline with
imgclf, so no candidate needs the network.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.config import Config, build_config

PRETRAINED = "tf_efficientnet_lite0"
CANDIDATES: dict[str, dict] = {
    "linear probe": {"name": PRETRAINED, "pretrained": True, "head": "logreg"},
    "small CNN": {},
    "fine-tuned EfficientNet-Lite0": {"name": PRETRAINED, "pretrained": True},
}
SLUGS = {"linear probe": "probe", "small CNN": "small_cnn", "fine-tuned EfficientNet-Lite0": "finetune"}


def candidate_config(base: Config, name: str, out: Path) -> Config:
    """``base`` with the model of candidate ``name``, writing to ``out``."""
    values = base.model_dump()
    values["model"] = dict(CANDIDATES[name])
    values["out"] = str(out)
    return build_config(values)


def is_default_request(config: Config) -> bool:
    """True when nothing about the network was chosen: no model setting, no stages, no start run.

    Only fields given explicitly count (pydantic's ``model_fields_set``): a config file or a flag
    that names any model setting trains exactly that, as before.
    """
    return not (config.model.model_fields_set or config.stages or config.train.init_from
                or "model" in config.model_fields_set)
