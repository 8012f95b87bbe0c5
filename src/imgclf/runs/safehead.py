"""Load a scikit-learn head (``head.skops``) without trusting the file.

skops loads only types it is told to trust, so the question is what to trust. imgclf writes four
heads, each ``Pipeline(StandardScaler, estimator)`` (or ``Pipeline(estimator)`` with ``head_scale:
false``); for each kind the exact node types (module.class and skops loader) that such a file holds
are listed below, built from the classes themselves. Before anything is constructed, every node of
the file's schema must be on the list for the run's head kind: no prefix rule, so a callable such as
``numpy.testing...runstring`` reached through a reduce node is refused, and nothing in the file runs.

Trusted types are not enough on their own: scikit-learn indexes a decision tree's arrays and
libsvm its support vectors without bounds checks, so a crafted file could crash the process at
inference. After loading, the structure and the arrays are checked against each other (trees: child
indices point forward and in range, features exist; SVM: counts agree). A k-NN's search tree is
rebuilt from its stored training features rather than trusted.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from sklearn.calibration import CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics._dist_metrics import EuclideanDistance64
from sklearn.neighbors import KDTree, KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier
from sklearn.tree._tree import Tree

from imgclf.errors import RunDirError
from imgclf.safeio import require_regular

MAX_HEAD_BYTES = 2 << 30  # uncompressed; a head is features x classes numbers, far below this
# schema.json describes the head's objects (about 15 kB a tree: 30 MB for the 2,000 trees --head rf may have);
# parsing it takes ~25x its size in memory, so it is capped well below the whole file's limit
MAX_SCHEMA_BYTES = 64 << 20


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_PLAIN = {f"builtins.{t}": {"DictNode", "ListNode", "TupleNode", "JsonNode", "TypeNode"}
          for t in ("dict", "list", "tuple", "str", "int", "float", "bool", "NoneType")}
_ARRAYS = {f"numpy.{t}": {"NdArrayNode"} for t in ("ndarray", "float64", "float32", "int64", "int32", "intp")}
_OBJECTS = {"svm": (CalibratedClassifierCV, _CalibratedClassifier, _SigmoidCalibration, SVC),
            "logreg": (LogisticRegression,),
            "knn": (KNeighborsClassifier, KDTree, EuclideanDistance64),
            "rf": (RandomForestClassifier, DecisionTreeClassifier)}
ESTIMATORS = {"svm": CalibratedClassifierCV, "logreg": LogisticRegression, "knn": KNeighborsClassifier,
              "rf": RandomForestClassifier}


def allowed_nodes(kind: str) -> dict[str, set[str]]:
    """{type name: skops loaders allowed for it} in a head file of ``kind``."""
    nodes = {**_PLAIN, **_ARRAYS, _name(Pipeline): {"ObjectNode"}, _name(StandardScaler): {"ObjectNode"}}
    nodes.update({_name(cls): {"ObjectNode"} for cls in _OBJECTS[kind]})
    if kind == "rf":
        nodes[_name(Tree)] = {"TreeNode"}
    return nodes


def load_head(path: Path, kind: str, n_features: int | None = None, n_classes: int | None = None,
              scaled: bool = True):
    """The head saved at ``path`` for a run trained with ``--head kind`` (``scaled``: with its
    StandardScaler, else the estimator alone, ``head_scale: false``); refuses anything else.

    With ``n_features`` (the backbone's embedding width) and ``n_classes``, the head's arrays must
    fit them: a head that would fail or read out of bounds at inference is refused here.
    """
    from skops.io import load  # skops only when a scikit-learn head is used

    if kind not in ESTIMATORS:
        raise RunDirError(f"{path}: unknown head kind {kind!r} in the run's config")
    types = schema_types(path)
    allowed = allowed_nodes(kind)
    foreign = sorted(f"{t} ({loader})" for t, loader in types if loader not in allowed.get(t, ()))
    if foreign:
        raise RunDirError(f"{path} holds types imgclf never writes for a {kind} head ({', '.join(foreign[:3])}); "
                          "refusing to load it: restore the run or re-train")
    try:
        head = load(path, trusted=sorted({t for t, _ in types}))
    except Exception as err:  # skops raises many kinds on a malformed file; none may escape as a traceback
        raise RunDirError(f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}); re-train") from None
    return check_head(head, kind, path, n_features, n_classes, scaled)


def schema_types(path: Path) -> set[tuple[str, str]]:
    """(module.class, loader) of every node in a skops file, read from its JSON schema, constructing nothing."""
    try:
        require_regular(path, RunDirError, "restore the run or re-train")
        with zipfile.ZipFile(path) as archive:
            if sum(info.file_size for info in archive.infolist()) > MAX_HEAD_BYTES:
                raise RunDirError(f"{path} unpacks to more than {MAX_HEAD_BYTES >> 30} GiB; refusing it")
            with archive.open("schema.json") as member:  # read no further than the cap, whatever the zip declares
                text = member.read(MAX_SCHEMA_BYTES + 1)
            if len(text) > MAX_SCHEMA_BYTES:
                raise RunDirError(f"{path}: its schema.json is over {MAX_SCHEMA_BYTES >> 20} MB, far more than a head "
                                  "imgclf writes; refusing it: restore the run or re-train")
            schema = json.loads(text)
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; the run was trained with a scikit-learn head and needs it") from None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:  # ValueError: JSON, UTF-8, 4,300-digit ints
        raise RunDirError(f"{path} is not a skops file ({err}); restore the run or re-train") from None
    except RecursionError:
        raise RunDirError(f"{path}: its schema is nested far deeper than a head; refusing it") from None
    found: set[tuple[str, str]] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__loader__" in node:
                found.add((f"{node.get('__module__')}.{node.get('__class__')}", str(node["__loader__"])))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def check_head(head, kind: str, path: Path, n_features: int | None = None, n_classes: int | None = None,
               scaled: bool = True):
    """The loaded pipeline has imgclf's shape, internally consistent arrays, and fits the run's model."""
    steps = getattr(head, "steps", None)
    expected = (StandardScaler, ESTIMATORS[kind]) if scaled else (ESTIMATORS[kind],)
    if not (isinstance(head, Pipeline) and isinstance(steps, list) and len(steps) == len(expected)
            and all(isinstance(step, tuple) and len(step) == 2 and type(step[1]) is cls
                    for step, cls in zip(steps, expected, strict=True))):
        what = "StandardScaler + " if scaled else "unscaled (head_scale: false) "
        raise RunDirError(f"{path} is not the {what}{kind} pipeline imgclf writes; re-train")
    estimator = steps[-1][1]
    try:
        n_features = _check_scaler(steps[0][1], n_features) if scaled else _width(estimator, n_features)
        if n_classes is not None and not np.array_equal(np.asarray(estimator.classes_), np.arange(n_classes)):
            raise ValueError(f"classes_ is not 0..{n_classes - 1}")
        if kind == "logreg":
            _check_linear(estimator, n_features)
        elif kind == "rf":
            for tree in estimator.estimators_:
                _check_tree(tree.tree_, n_features)
        elif kind == "svm":
            for calibrated in estimator.calibrated_classifiers_:
                _check_svc(calibrated.estimator, n_features)
        elif kind == "knn":
            _rebuild_neighbours(estimator, n_features)
    except (AttributeError, TypeError, ValueError, IndexError) as err:
        raise RunDirError(f"{path}: the {kind} head's arrays are inconsistent ({err}); re-train") from None
    return head


def _check_tree(tree, n_features: int) -> None:
    nodes = tree.__getstate__()["nodes"]
    count = len(nodes)
    ids = np.arange(count)
    left, right, feature = nodes["left_child"], nodes["right_child"], nodes["feature"]
    leaf = left == -1
    if not (np.array_equal(leaf, right == -1) and count >= 1):
        raise ValueError("a node has one child")
    inner = ~leaf
    # scikit-learn numbers children after their parent: forward, in-range links cannot loop or escape
    if not (np.all(left[inner] > ids[inner]) and np.all(right[inner] > ids[inner])
            and np.all(left[inner] < count) and np.all(right[inner] < count)):
        raise ValueError("tree child indices out of range")
    if not np.all((feature[inner] >= 0) & (feature[inner] < n_features)):
        raise ValueError("tree splits on a feature the input does not have")
    if tree.value.shape[0] != count:
        raise ValueError("tree values do not match its nodes")


def _check_svc(svc, n_features: int) -> None:
    n_support, vectors, dual = np.asarray(svc._n_support), np.asarray(svc.support_vectors_), np.asarray(svc.dual_coef_)
    k = len(svc.classes_)
    shapes_fit = vectors.ndim == 2 and vectors.shape[1] == n_features and dual.shape[0] == k - 1
    counts_fit = len(n_support) == k and n_support.min() >= 0 and n_support.sum() == vectors.shape[0] == dual.shape[1]
    if not (shapes_fit and counts_fit and np.asarray(svc.intercept_).shape == (k * (k - 1) // 2,)):
        raise ValueError("support-vector counts disagree")


def _rebuild_neighbours(knn, n_features: int) -> None:
    """Refit the k-NN on its own stored features and labels: the stored search tree is never used."""
    features, labels = np.asarray(knn._fit_X, dtype=np.float64), np.asarray(knn.classes_)[np.asarray(knn._y)]
    if features.ndim != 2 or features.shape[1] != n_features:
        raise ValueError(f"stored features {features.shape} do not have {n_features} columns")
    knn.set_params(algorithm="brute")
    knn.fit(features, labels)


def _check_scaler(scaler, n_features: int | None) -> int:
    """The standardiser's width (the number of features the head takes), equal to the backbone's if known."""
    mean, scale = np.asarray(scaler.mean_), np.asarray(scaler.scale_)
    if mean.ndim != 1 or mean.shape != scale.shape or (n_features is not None and len(mean) != n_features):
        raise ValueError(f"the scaler takes {mean.shape} features, the backbone gives {n_features}")
    return len(mean)


def _width(estimator, n_features: int | None) -> int:
    """An unscaled head's width: the count the estimator was fitted on, equal to the backbone's if known."""
    width = getattr(estimator, "n_features_in_", None)
    if not isinstance(width, int | np.integer) or isinstance(width, bool) or width < 1:
        raise ValueError(f"n_features_in_ {width!r} is not a feature count")
    if n_features is not None and width != n_features:
        raise ValueError(f"the head takes {width} features, the backbone gives {n_features}")
    return int(width)


def _check_linear(logreg, n_features: int) -> None:
    coef, intercept = np.asarray(logreg.coef_), np.asarray(logreg.intercept_)
    if coef.ndim != 2 or coef.shape[1] != n_features or intercept.shape != (coef.shape[0],):
        raise ValueError(f"coef_ {coef.shape} and intercept_ {intercept.shape} do not fit {n_features} features")
