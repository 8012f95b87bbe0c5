"""``--init-from RUN``: start a training from a whole trained run, head included.

The notebook's ``model = load_model(...)`` followed by another ``fit``. The source is a run
directory, so it is read as any run is (manifest, schemas), and it must hold the network this
config builds: the same model settings (those that only say where the weights come from aside),
the same classes in the same order, the same input size and channels. Anything else is one line
naming the first difference, instead of a silently re-initialised head.
"""

from __future__ import annotations

from pathlib import Path

from imgclf.config import Config, ModelConfig
from imgclf.config.sections import TYPED_SUFFIX
from imgclf.errors import ConfigError, ImgclfError
from imgclf.logs import get_logger
from imgclf.models.networks import Preprocess
from imgclf.runs.base import load_run, recorded_kind
from imgclf.runs.network import MODEL_FILE, NetworkRun

log = get_logger("init_from")

# Model fields that say where a network's first weights come from, or which head reads its features:
# two runs that differ only here hold the same network.
START_FIELDS = ("pretrained", "weights", "weights_map", "head")


def check_weights_file(config: Config) -> None:
    """``--weights`` takes a state-dict file; a folder (a run directory) is what --init-from is for. With
    ``--pretrained`` as well, one of the two would be dropped: refused."""
    weights = config.model.weights
    if weights and config.model.pretrained:
        raise ConfigError(f"--pretrained and --weights {weights} both give the starting weights; keep one "
                          "(--pretrained: ImageNet's, --weights: that file's)")
    if weights and Path(weights).is_dir():
        raise ConfigError(f"--weights {weights} is a folder; --weights takes a state-dict file (.safetensors, "
                          f".pth, .bin) for the backbone. To start from a trained run, head included, pass "
                          f"--init-from {weights}")


def init_weights(config: Config, classes: tuple[str, ...] | list[str], preprocess: Preprocess) -> Path | None:
    """The weights file of ``train.init_from`` after checking it holds this config's network; None without one."""
    if not config.train.init_from:
        return None
    source = Path(config.train.init_from)
    try:
        kind = recorded_kind(source)
        if kind != "network":
            raise ConfigError(f"{source} is a {kind} run; it holds no trained network of its own to start from, "
                              "so pass a network run (trained with the default --head linear)")
        run = load_run(source)  # a NetworkRun: its kind is network
        difference = _first_difference(run, config.model, list(classes), preprocess)
    except ImgclfError as err:
        raise ConfigError(f"--init-from: {err}") from None
    if difference:
        raise ConfigError(f"--init-from {source}: {difference}; train with that run's model settings (e.g. "
                          f"--config {source / 'config.yaml'}) or drop --init-from")
    if config.model.pretrained:
        log.info("init-from %s: its trained weights replace the ImageNet ones (not downloaded)", source)
    log.info("init-from %s: the whole model, head included, starts from its %s (epoch %s)", source, MODEL_FILE,
             run.meta.epoch)
    return source / MODEL_FILE


def _first_difference(run: NetworkRun, model: ModelConfig, classes: list[str], preprocess: Preprocess) -> str | None:
    """What makes the run's network differ from the one ``model`` builds, in words; None when they agree."""
    if run.classes != classes:
        return f"its classes are {run.classes}, this dataset's are {classes}"
    theirs = run.config.model
    for name in type(model).model_fields:
        if name in START_FIELDS or name.endswith(TYPED_SUFFIX):
            continue
        if getattr(theirs, name) != getattr(model, name):
            return f"its model.{name} is {getattr(theirs, name)!r}, this config's is {getattr(model, name)!r}"
    saved = run.preprocess
    if (saved.size, saved.channels) != (preprocess.size, preprocess.channels):
        return (f"it takes {saved.size} px images with {saved.channels} channel(s), this config "
                f"{preprocess.size} px with {preprocess.channels}")
    return None
