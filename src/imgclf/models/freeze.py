"""Which parameters train: freeze policies, frozen BatchNorm, and parameter groups.

Policies (``freeze`` in a stage or the train config):
- ``none``: everything trains;
- ``backbone``: only the head trains (the backbone is a fixed feature extractor);
- ``last:N``: the head and the backbone's last N layers with weights (convolutions, linears,
  ...) train; normalisation layers among them train too unless ``freeze_bn``;
- ``regex:PATTERN``: the head and backbone parameters whose name matches PATTERN
  (``re.search``, e.g. ``conv5|denseblock4`` or ``blocks\\.6``).

A normalisation layer whose parameters are all frozen is also kept in eval mode, so its running
statistics stay those of the pretrained network (Keras does the same for ``trainable=False``).
"""

from __future__ import annotations

import re

from torch import nn

from imgclf.config import check_policy
from imgclf.errors import ConfigError
from imgclf.logs import get_logger

log = get_logger("freeze")

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def weighted_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, in registration (forward) order. Not only leaves: timm's BatchNormAct2d
    (EfficientNet, MobileNet) holds its activation as a child, and a ConvNeXt block owns its layer scale."""
    return [(name, m) for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


def apply_freeze(model: nn.Module, policy: str, freeze_bn: bool = False, say: bool = True) -> None:
    """Set ``requires_grad`` on ``model.backbone`` by ``policy``; the head always trains. ``say``: warn when the
    policy cannot do what it says (off where a finished run's counts are only read back: its training said it)."""
    check_policy(policy)
    backbone = model.backbone
    for p in model.parameters():
        p.requires_grad = True
    if policy == "none":
        trainable = {name for name, _ in backbone.named_parameters()}
    elif policy == "backbone":
        trainable = set()
    elif policy.startswith("last:"):
        trainable = _last_layers(backbone, int(policy.split(":")[1]), freeze_bn, say)
    else:
        pattern = re.compile(policy.split(":", 1)[1])
        trainable = {name for name, _ in backbone.named_parameters() if pattern.search(name)}
        if not trainable:
            raise ConfigError(f"freeze={policy!r} matches no backbone parameter; see imgclf model-info MODEL")
    for name, param in backbone.named_parameters():
        param.requires_grad = name in trainable
    if freeze_bn:
        for module in backbone.modules():
            if isinstance(module, NORM_TYPES):
                for param in module.parameters(recurse=False):
                    param.requires_grad = False


def _last_layers(backbone: nn.Module, n: int, freeze_bn: bool, say: bool) -> set[str]:
    layers = weighted_layers(backbone)
    counted = [i for i, (_, m) in enumerate(layers) if not isinstance(m, NORM_TYPES)]
    if n == 0:
        return set()
    if n > len(counted) and say:
        log.warning("warning: freeze last:%d: the backbone has %d layers with weights, so all of them train", n,
                    len(counted))
    first = counted[-n] if n <= len(counted) else 0
    names = set()
    for name, module in layers[first:]:
        if freeze_bn and isinstance(module, NORM_TYPES):
            continue
        names |= {f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)}
    return names


def set_frozen_norms_eval(model: nn.Module) -> None:
    """After ``model.train()``: normalisation layers with no trainable parameter stay in eval mode."""
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def trains_batchnorm(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``model`` trains (in training mode it cannot take a batch of one image)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and (not list(m.parameters(recurse=False)) or any(p.requires_grad for p in m.parameters()))
               for m in model.modules())


def backbone_is_frozen(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def param_groups(model: nn.Module, backbone_lr_mult: float) -> list[dict]:
    """Trainable parameters: the head at the base lr, the backbone at ``lr * backbone_lr_mult``."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr_mult": 1.0}]
    if backbone:
        groups.append({"params": backbone, "lr_mult": backbone_lr_mult})
    return groups
