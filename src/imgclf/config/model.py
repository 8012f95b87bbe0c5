"""The model section of a run's config: the network, its layer lists and its input normalisation.

Split from ``sections`` (which imports it where the class used to be, so ``Config`` and the
re-exports are unchanged); the grammar of the layer lists is ``imgclf.config.layers``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, TypeAdapter, model_validator

from imgclf.config.layers import CONV_DEFAULTS, SIMPLE_CNN, settle_conv, settle_head
from imgclf.config.sections import AbsolutePath, Widths, _Section
from imgclf.errors import ConfigError

# Optional widths: the Optional outside the Annotated, so the field's type reads ``list[int] | None``
# and the CLI knows it is a list flag (``--dense-layers 256,128``).
_WIDTHS = TypeAdapter(Widths)  # the rules of Widths (count and range), for a list that may be absent
MaybeWidths = Annotated[list[int] | None, AfterValidator(lambda w: w if w is None else _WIDTHS.validate_python(w))]


class ModelConfig(_Section):
    """The network: a backbone (simple CNN layers, or a timm model cut where Keras cuts) under a head.

    The layer lists are what config.yaml records; the shorthand flags (``None``: not given) expand
    into them (``imgclf.config.layers``). A run's config.yaml from before the lists existed lists
    every older field and not ``pre_logits``: it rebuilds the network it trained (``_older_run``).
    """

    PATH_FIELDS = ("weights",)
    OLDER_FIELDS: ClassVar[frozenset[str]] = frozenset((
        "name", "head", "conv_filters", "kernel_size", "conv_dropout", "conv_batchnorm", "pool", "dense_layers",
        "dropout", "head_batchnorm", "binary_head", "pretrained", "weights", "weights_map"))
    name: str = Field("simple_cnn", description="simple_cnn or any timm model name (resnet18, ...) (default: "
                                             "simple_cnn; imgclf train given no model setting at all tries "
                                             "its candidates instead)")
    head: Literal["linear", "svm", "logreg", "knn", "rf"] = Field(
        "linear", description="linear: trained with the network; svm, logreg, knn, rf: a scikit-learn "
                              "classifier on frozen backbone features, its parameter chosen on validation")
    conv_layers: list[str] | None = Field(
        None, description="simple_cnn's layers in order, e.g. 'conv 32 3 valid relu, pool max 2' (grammar: README; "
                          "default: built from the four flags below)")
    conv_filters: MaybeWidths = Field(None, min_length=1, description="simple_cnn shorthand: filters per block "
                                        "(default: 32,64,128)")
    kernel_size: int | None = Field(None, ge=1, le=11, description="simple_cnn shorthand: kernel size (default: 3)")
    conv_dropout: float | None = Field(None, ge=0, lt=1, description="simple_cnn shorthand: dropout after each "
                                       "block (default: 0)")
    conv_batchnorm: bool | None = Field(None, description="simple_cnn shorthand: BatchNorm after each convolution "
                                        "(default: on)")
    pre_logits: bool = Field(False, description="timm models: keep the layers timm puts after the last feature map "
                             "(VGG's fc6/fc7, MobileNetV3's conv_head); off cuts where Keras include_top=False cuts "
                             "(runs before 0.2 kept them)")
    head_layers: list[str] | None = Field(
        None, description="the head before the final classifier, e.g. 'flatten, bn, dense 256 relu, dropout 0.4' "
                          "(grammar: README; default: built from the four flags below)")
    pool: Literal["avg", "max", "flatten"] | None = Field(
        None, description="head shorthand: how the feature map becomes a vector (default: avg)")
    dense_layers: MaybeWidths = Field(None, description="head shorthand: hidden dense layers, e.g. 512")
    dropout: float | None = Field(None, ge=0, lt=1, description="head shorthand: dropout before each dense layer "
                                  "and the classifier (default: 0.2)")
    head_batchnorm: bool | None = Field(None, description="head shorthand: BatchNorm on the pooled features "
                                        "(default: off)")
    binary_head: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="2 classes: 2-way softmax or a single logit trained with BCE")
    normalize: Literal["model", "imagenet", "rescale", "none"] | None = Field(
        None, description="input scaling: model (the timm model's own mean/std), imagenet, rescale (x/255, as Keras "
                          "notebooks), none (0..255) (default: model for timm models, rescale for simple_cnn)")
    pretrained: bool = Field(False, description="start from ImageNet weights (offline package, or timm's hub)")
    weights: AbsolutePath = Field(None, description="start from a local state dict (.safetensors, .pth, .pt, .bin)")
    weights_map: Literal["auto", "name", "position"] = Field(
        "auto", description="match --weights to the model by key name or by position")
    weights_as_typed: str | None = Field(None, description="model.weights as typed (informational)")

    @model_validator(mode="before")
    @classmethod
    def _older_run(cls, values: Any) -> Any:
        """An older run kept timm's pre-logits layers and ignored the conv flags of a timm model."""
        if not isinstance(values, dict) or not values.keys() >= cls.OLDER_FIELDS or "pre_logits" in values:
            return values
        timm = values.get("name") != SIMPLE_CNN
        unused = dict.fromkeys(CONV_DEFAULTS) if timm else {}
        return {**values, **unused, "pre_logits": timm}

    @model_validator(mode="after")
    def _layer_lists(self) -> ModelConfig:
        try:
            conv = settle_conv(self.__dict__, self.name == SIMPLE_CNN)
            head = settle_head(self.__dict__)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        self.__dict__.update(conv_layers=conv, head_layers=head)  # not setattr: that would validate again
        return self
