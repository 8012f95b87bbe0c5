"""A run as one exportable torch module: uint8 images in, ``logits`` and ``probabilities`` out.

The graph takes what ``load_image`` returns, stacked: ``N x S x S x C`` uint8 (already decoded,
EXIF-transposed, mode-converted and resized). Everything after that happens inside it: cast to
float, scale to [0, 1], normalise with the run's mean/std, the network, the run's test-time views,
then softmax or sigmoid as the run trained. Resizing stays outside, so there is exactly one resize
implementation (``imgclf.data.images.load_image``) for evaluation, predict, export and the server.

An ensemble (soft, weighted or majority vote) is one graph: each member normalises the same uint8
input its own way and the votes are combined as ``runs.ensemble.combine`` does. Its ``logits`` are the
log of the combined probabilities (softmax of them gives the probabilities back).

``reference_probs`` is the torch engine on the same uint8 arrays, in fp32 on the CPU: the parity
gate compares the exported graph against it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imgclf.data.transforms import build_eval_transform, tta_views
from imgclf.errors import ConfigError
from imgclf.evaluation.evaluate import predict_probs
from imgclf.models.networks import Preprocess
from imgclf.runs.ensemble import TIE_BREAK, EnsembleRun, combine
from imgclf.runs.heads import ClassicalRun
from imgclf.runtime import Compute

CPU_FP32 = Compute(torch.device("cpu"))
LOG_FLOOR = 1e-12  # an ensemble's logits are log(probabilities); a zero probability becomes log(1e-12)


@dataclass(frozen=True)
class InputSpec:
    """What the graph (and every engine) takes: ``size x size x channels`` uint8, resized with ``interpolation``."""

    size: int
    channels: int
    interpolation: str

    @classmethod
    def of(cls, pre: Preprocess) -> InputSpec:
        return cls(pre.size, pre.channels, pre.interpolation)


def refuse_classical(run) -> None:
    if isinstance(run, ClassicalRun):
        raise ConfigError(f"{run.path} is not exportable yet: its head is a scikit-learn {run.config.model.head}, "
                          "which has no ONNX form in imgclf; predict or serve it with --engine torch, or train a "
                          "network head (--head linear)")


def input_spec(run) -> InputSpec:
    """The run's input; an ensemble's members must agree on it, since the one resize happens outside."""
    if not isinstance(run, EnsembleRun):
        return InputSpec.of(run.preprocess)
    specs = {m.path: input_spec(m) for m in run.members}
    if len(set(specs.values())) > 1:
        listed = "; ".join(f"{p.name}: {s.size} px, {s.channels} ch, {s.interpolation}" for p, s in specs.items())
        raise ConfigError(f"{run.path} is not exportable or servable yet: its members take different inputs "
                          f"({listed}); ensemble members trained at one image size, channel count and filter")
    return next(iter(specs.values()))


def tta_of(run) -> str:
    """The test-time augmentation the run predicts with; an ensemble's members may each have their own."""
    if isinstance(run, EnsembleRun):
        kinds = {tta_of(m) for m in run.members}
        return kinds.pop() if len(kinds) == 1 else "per member"
    return run.config.evaluate.tta


def cpu_model(run) -> nn.Module:
    """An fp32, contiguous CPU copy of the run's network (the run's own may sit on a GPU, channels-last)."""
    model = copy.deepcopy(run.model).float().cpu().eval()
    return model.to(memory_format=torch.contiguous_format)


class NetworkGraph(nn.Module):
    """uint8 ``N x S x S x C`` -> (logits as trained, ``N x K`` probabilities averaged over the tta views)."""

    def __init__(self, model: nn.Module, pre: Preprocess, sigmoid: bool, tta: str):
        super().__init__()
        self.model, self.sigmoid, self.views = model, sigmoid, tta_views(tta)
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sigmoid:
            p1 = torch.sigmoid(logits[:, :1])
            return torch.cat([1 - p1, p1], dim=1)
        return torch.softmax(logits, dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - self.mean) / self.std
        logits = self.model(x)
        probs = self.probabilities(logits)
        for view in self.views[1:]:
            probs = probs + self.probabilities(self.model(view(x)))
        return logits, probs / len(self.views)


class EnsembleGraph(nn.Module):
    """The members' graphs on the same uint8 input, their probabilities combined by the ensemble's vote."""

    def __init__(self, members: list[nn.Module], method: str, weights: list[float] | None):
        super().__init__()
        self.members, self.method = nn.ModuleList(members), method
        w = weights if weights is not None else [1 / len(members)] * len(members)
        self.register_buffer("weights", torch.tensor(w, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stack = torch.stack([member(images)[1] for member in self.members])  # M x N x K
        if self.method == "majority":
            votes = nn.functional.one_hot(stack.argmax(dim=2), stack.shape[2]).to(torch.float32).mean(dim=0)
            votes = votes + TIE_BREAK * stack.mean(dim=0)
            probs = votes / votes.sum(dim=1, keepdim=True)
        else:
            probs = (stack * self.weights).sum(dim=0)
        return torch.log(probs.clamp(min=LOG_FLOOR)), probs


def build_graph(run) -> nn.Module:
    """The run as one module (eval mode, fp32, CPU); a scikit-learn head is refused."""
    refuse_classical(run)
    if isinstance(run, EnsembleRun):
        input_spec(run)
        return EnsembleGraph([build_graph(m) for m in run.members], run.spec.method, run.spec.weights).eval()
    return NetworkGraph(cpu_model(run), run.preprocess, run.objective.sigmoid, tta_of(run)).eval()


class ArrayImages(Dataset):
    """Decoded ``S x S x C`` uint8 arrays as the torch engine's items: (normalised image, -1, position)."""

    def __init__(self, images: np.ndarray, pre: Preprocess):
        self.images, self.transform = images, build_eval_transform(pre.mean, pre.std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(torch.from_numpy(self.images[i].transpose(2, 0, 1).copy())), -1, i


def array_loader(images: np.ndarray, pre: Preprocess, batch_size: int) -> DataLoader:
    return DataLoader(ArrayImages(images, pre), batch_size=batch_size)


def reference_probs(run, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """``N x K`` probabilities of the torch engine for uint8 ``images``, in fp32 on the CPU.

    The same code the run predicts with (its eval transform, ``predict_probs``, its tta, the
    ensemble's ``combine``), only with an fp32 CPU copy of each network.
    """
    refuse_classical(run)
    if isinstance(run, EnsembleRun):
        parts = [reference_probs(m, images, batch_size) for m in run.members]
        return combine(parts, run.spec.method, run.spec.weights)
    loader = array_loader(images, run.preprocess, batch_size)
    return predict_probs(cpu_model(run), run.objective, loader, CPU_FP32, run.config.evaluate.tta)


def engine_probs(run, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """``N x K`` probabilities of the torch engine as the run predicts (fp32 on its device, its tta).

    The same ``loader_probs`` that ``imgclf predict`` uses, over already decoded arrays; an ensemble
    combines its members' as ``EnsembleRun.predict`` does.
    """
    if isinstance(run, EnsembleRun):
        return combine([engine_probs(m, images, batch_size) for m in run.members], run.spec.method, run.spec.weights)
    return run.loader_probs(array_loader(images, run.preprocess, batch_size or run.batch_size))


def run_computes(run) -> list[str]:
    """Where and how the run's torch engine computes, e.g. ``["fp32 on cpu"]`` (one entry per distinct member)."""
    if isinstance(run, EnsembleRun):
        return sorted({c for m in run.members for c in run_computes(m)})
    return [f"{run.compute.precision} on {run.compute.device.type}"]
