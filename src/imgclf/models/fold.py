"""A frozen network made cheaper to run: each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed per-channel scale and shift, so it can be multiplied into the
convolution that feeds it (torch's ``fuse_conv_bn_weights``), and the network then skips one
memory-bound pass per convolution. On the linear probe's EfficientNet-Lite0 (49 such pairs) at
150 px on 2 CPU cores, the probe's uncached features took 8.7-9.7 s folded against 10.2-11.8 s
(1,800 images); bf16 weights on top measured within noise and are not used.

Which convolution feeds which BatchNorm is read from the order the modules were registered in,
which is the forward order in timm's blocks; ``folded`` then checks that the folded network gives
the unfolded one's outputs (the backbone's feature map, for imgclf's Classifier) on a small input,
and keeps the unfolded one (with a warning) if not.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from imgclf.logs import get_logger

log = get_logger("fold")

CHECK_SIZE = 64  # px of the check's random images
CHECK_TOLERANCE = 1e-3  # relative to the outputs' largest magnitude (fp32 folding differs by ~1e-6)


def folded(model: nn.Module, channels: int) -> nn.Module:
    """A copy of ``model``, in eval mode, with its Conv2d -> BatchNorm2d pairs folded and checked against
    ``model`` (``model`` keeps its mode); ``model`` itself when there is nothing to fold or the check fails."""
    fast = copy.deepcopy(model).eval()
    if _fold_pairs(fast) == 0:
        return model
    problem = _check(model, fast, channels)
    if problem:
        log.warning("warning: %s's BatchNorm layers are not folded: %s; it runs unfolded", type(model).__name__,
                    problem)
        return model
    return fast


def _check(model: nn.Module, fast: nn.Module, channels: int) -> str | None:
    """Why ``fast`` cannot stand in for ``model`` in eval mode, or None: compared on random images, at the
    backbone's output where there is one (imgclf's Classifier: the feature map before pooling and head),
    else the output. A check that cannot run trusts nothing."""
    was_training = model.training
    parameter = next(model.parameters())
    sample = torch.randn(2, channels, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
    sample = sample.to(parameter.device, parameter.dtype)
    try:
        with torch.no_grad():
            expected = getattr(model.eval(), "backbone", model)(sample).float()
            got = getattr(fast, "backbone", fast)(sample).float()
    except (RuntimeError, TypeError, ValueError) as error:
        return f"the check on {CHECK_SIZE} px random images could not run ({str(error).splitlines()[0][:120]})"
    finally:
        model.train(was_training)
    scale = float(expected.abs().max()) or 1.0
    if torch.allclose(got, expected, rtol=0, atol=CHECK_TOLERANCE * scale):
        return None
    return "folding changed its outputs"


def _fold_pairs(module: nn.Module) -> int:
    """Fold every BatchNorm2d registered right after a Conv2d of the same parent; the number folded."""
    count = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.num_features == conv.out_channels):
                continue
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
            setattr(parent, bn_name, _after_norm(bn))
            count += 1
    return count


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What the BatchNorm did after normalising: timm's BatchNormAct2d applies its ``drop`` and ``act``."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
    return nn.Sequential(*rest) if rest else nn.Identity()
