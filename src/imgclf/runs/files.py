"""The files of a run directory, as schemas: each is validated before any of it is used. A run directory is a file
from a stranger. Every JSON file is read with a size cap, parsed, and checked against a schema whose bounds match
what training (and the report) can use; a problem is one line naming the file and field. Nothing is executed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import TypedDict  # pydantic reads typing's own only from Python 3.12

from imgclf.config import EvaluateConfig
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.predictions import MAX_CLASSES
from imgclf.runs.names import ClassName
from imgclf.safeio import read_capped

# No run file imgclf writes comes near this; a bigger one is refused before it is read into memory.
MAX_JSON_BYTES = 64 << 20
CONFUSION_CELL_BYTES = 20  # a confusion-matrix count in indented JSON: "        1234,\n" is 14
MAX_MEMBERS = 64
FIX = "re-train, restore the file, or after a deliberate edit run 'imgclf seal RUN'"
T = TypeVar("T")
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]  # an int is taken too (1 for 1.0), never NaN or inf
Ratio = Annotated[StrictFloat, Field(ge=0, le=1 + 1e-9, allow_inf_nan=False)]  # a score in [0, 1] (rounding aside)
Interval = tuple[Finite, Finite] | None  # [low, high] of a 95% interval; None where it could not be computed


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessFile(_File):
    """What an input image must look like; the bounds are the config's (image_size <= 4096)."""

    size: StrictInt = Field(ge=1, le=4096)
    channels: Literal[1, 3]
    mean: list[Finite]
    std: list[StrictFloat]
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"

    @model_validator(mode="after")
    def _per_channel(self) -> PreprocessFile:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError("std must be positive finite numbers")
        return self


class ModelFile(_File):
    """model.json (and best.json): the architecture's metadata, saved next to the weights."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: dict[str, Any]
    classes: list[ClassName] = Field(min_length=2, max_length=MAX_CLASSES)
    preprocess: PreprocessFile
    output_units: StrictInt = Field(ge=1, le=MAX_CLASSES)
    epoch: StrictInt | None = Field(None, ge=0)
    averaged_epochs: list[StrictInt] | None = None


class ThresholdFile(_File):
    """threshold.json: the binary decision threshold chosen on validation."""

    rule: str
    threshold: StrictFloat = Field(ge=0, le=1, allow_inf_nan=False)
    positive_class: str
    chosen_on: Literal["val"] = "val"

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, rule: str) -> str:
        try:
            return EvaluateConfig.check_threshold(rule)
        except ConfigError as err:
            raise ValueError(str(err)) from None


class EnsembleFile(_File):
    """ensemble.json: member run directories, the vote and its weights."""

    members: list[str] = Field(min_length=2, max_length=MAX_MEMBERS)
    method: Literal["soft", "weighted", "majority"]
    weights: list[StrictFloat] | None = None
    fitted_on: Literal["val"] | None = None
    member_seals: list[dict[str, str]] | None = Field(None, max_length=MAX_MEMBERS)  # manifest.probability_seal's

    @field_validator("weights")
    @classmethod
    def _weights_fit(cls, weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        members = info.data.get("members") or []
        if weights is not None and len(weights) != len(members):
            raise ValueError(f"{len(weights)} values for {len(members)} members")
        if weights is not None and (not all(math.isfinite(w) and w >= 0 for w in weights)
                                    or abs(sum(weights) - 1) > 1e-6):
            raise ValueError("weights must be non-negative and sum to 1")
        return weights


class DatasetFile(BaseModel):
    """dataset.json: where the images are, and what the scan found."""

    model_config = ConfigDict(extra="allow")
    root: str = Field(min_length=1, max_length=4096)  # a path: PATH_MAX
    counts: dict[str, dict[str, Annotated[StrictInt, Field(ge=0, le=10**10)]]] = {}  # images: no dataset has more
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []


class Intervals(BaseModel):
    """A split's ``intervals``: metric name -> [low, high] or null, as ``confidence_intervals`` writes them."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Interval]  # a metric this version does not know still holds an interval
    level: Finite | None = None
    auc_resamples: StrictInt | None = Field(None, ge=0)
    per_class: dict[str, dict[str, Interval]] | None = Field(None, max_length=MAX_CLASSES)


# One class's row of ``per_class`` (scikit-learn's classification report): the four numbers a report shows.
ClassScores = TypedDict("ClassScores", {"precision": Finite, "recall": Finite, "f1-score": Finite,
                                        "support": Annotated[Finite, Field(ge=0)]})


class SplitMetrics(BaseModel):
    """The numbers of one split in metrics.json that reports format; the rest is shown as stored."""

    model_config = ConfigDict(extra="allow")
    n: StrictInt = Field(ge=0, le=10**10)  # more images than any dataset, far fewer digits than a planted 400
    accuracy: Ratio | None = None
    balanced_accuracy: Ratio | None = None
    f1_macro: Ratio | None = None
    roc_auc_ovr: Ratio | None = None
    log_loss: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)] | None = None
    ece: Ratio | None = None
    sensitivity: Ratio | None = None
    specificity: Ratio | None = None
    ppv: Ratio | None = None
    npv: Ratio | None = None
    threshold: Finite | None = None
    intervals: Intervals | None = None
    per_class: dict[str, ClassScores] | None = Field(None, max_length=MAX_CLASSES)
    confusion_matrix: list[list[Annotated[StrictInt, Field(ge=0)]]] | None = Field(None, max_length=MAX_CLASSES)

    @field_validator("confusion_matrix")
    @classmethod
    def _square(cls, rows: list[list[int]] | None) -> list[list[int]] | None:
        if rows is not None and any(len(row) != len(rows) for row in rows):
            raise ValueError(f"not square: {len(rows)} rows of {sorted({len(r) for r in rows})[:3]} counts")
        return rows


class GridBest(BaseModel):
    """best.json of a grid directory."""

    model_config = ConfigDict(extra="allow")
    best_trial: str
    params: dict[str, Any]
    test: SplitMetrics | None = None


CLASSES = TypeAdapter(list[ClassName])


def read_json(path: Path, limit: int = MAX_JSON_BYTES, fix: str = FIX) -> Any:
    """A JSON file of a run directory, size-capped; missing or damaged is a one-line RunDirError (with ``fix``)."""
    try:
        return json.loads(read_capped(path, limit, RunDirError, fix).decode("utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; the run directory is incomplete") from None
    except ValueError as err:  # not JSON, not UTF-8, or an integer past Python's 4,300 digits
        reason = getattr(err, "msg", None) or (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise RunDirError(f"{path} is damaged ({reason}); {fix}") from None
    except RecursionError:
        raise RunDirError(f"{path} is nested far deeper than any file imgclf writes; {fix}") from None


def validate(path: Path, schema: type[T], data: Any) -> T:
    """``data`` (read from ``path``) as ``schema``, or a one-line RunDirError naming the file and field."""
    try:
        return schema.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as err:
        raise RunDirError(f"{path}: {_first_problem(err)}; {FIX}") from None


def read_model_file(path: Path) -> ModelFile:
    return validate(path, ModelFile, read_json(path))


def read_threshold(path: Path, classes: list[str]) -> ThresholdFile:
    file = validate(path, ThresholdFile, read_json(path))
    if file.positive_class not in classes:
        raise RunDirError(f"{path}: positive_class {file.positive_class!r} is not a class of the run; {FIX}")
    return file


def read_ensemble(path: Path) -> EnsembleFile:
    return validate(path, EnsembleFile, read_json(path))


def read_dataset(path: Path) -> DatasetFile:
    return validate(path, DatasetFile, read_json(path))


BASELINES_KEY = "baselines"  # metrics.json's one entry that is not a split (see ``Baseline``)


class Baseline(BaseModel):
    """One row of metrics.json's ``baselines``: a model the run is shown next to, on the same images."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    role: Literal["baseline", "candidate"]
    val: SplitMetrics | None = None
    test: SplitMetrics | None = None
    seconds: StrictFloat | StrictInt | None = Field(None, ge=0)
    note: str = Field("", max_length=1000)


BASELINES = TypeAdapter(list[Baseline])


def read_metrics(path: Path, one_split: bool = False, n_classes: int = 0,
                 fix: str = "delete it and evaluate again") -> dict:
    """metrics.json's splits ({split: metrics}) or, with ``one_split``, one split's metrics, checked before
    formatting; its ``baselines`` entry is checked too, and read with ``read_baselines``. Confusion matrices are
    K x K numbers a split (indented, a line each): the size cap grows with ``n_classes`` as they do."""
    data = read_json(path, MAX_JSON_BYTES + 2 * CONFUSION_CELL_BYTES * n_classes ** 2, fix)
    splits = {"all": data} if one_split else data
    if not isinstance(splits, dict):
        raise RunDirError(f"{path} must hold an object of splits; {fix}")
    if not one_split and BASELINES_KEY in splits:
        _checked_baselines(path, splits[BASELINES_KEY])
        splits = {k: v for k, v in splits.items() if k != BASELINES_KEY}
    for split, metrics in splits.items():
        try:
            SplitMetrics.model_validate(metrics)
        except ValidationError as err:
            where = "" if one_split else f"{split}."
            raise RunDirError(f"{path}: {where}{_first_problem(err)}; {fix}") from None
    return data if one_split else splits


def read_baselines(path: Path) -> list[dict]:
    """metrics.json's ``baselines`` rows (empty when it has none, or the file is absent)."""
    if not path.exists():
        return []
    data = read_json(path)
    return _checked_baselines(path, data.get(BASELINES_KEY, [])) if isinstance(data, dict) else []


def _checked_baselines(path: Path, rows: Any) -> list[dict]:
    try:
        BASELINES.validate_python(rows)
    except ValidationError as err:
        raise RunDirError(f"{path}: {BASELINES_KEY}.{_first_problem(err)}; delete it and evaluate again") from None
    return rows


def read_grid_best(path: Path) -> dict:
    data = read_json(path, fix="run the grid again")
    try:
        GridBest.model_validate(data)
    except ValidationError as err:
        raise RunDirError(f"{path}: {_first_problem(err)}; run the grid again") from None
    return data


def read_classes(path: Path) -> list[str]:
    data = read_json(path)
    try:
        classes = CLASSES.validate_python(data)
    except ValidationError as err:
        raise RunDirError(f"{path}: {_first_problem(err, 'classes')}; {FIX}") from None
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise RunDirError(f"{path}: a run has 2 to {MAX_CLASSES} classes, this lists {len(classes)}; {FIX}")
    if len(set(classes)) != len(classes):
        raise RunDirError(f"{path}: class names must be unique; {FIX}")
    return classes


def _first_problem(err: ValidationError, root: str = "") -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or root or "file"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"  # a validator's own words
