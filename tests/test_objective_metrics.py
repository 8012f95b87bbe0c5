import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from imgclf.errors import RunDirError
from imgclf.evaluation.metrics import compute_metrics, f1_and_log_loss
from imgclf.evaluation.predictions import Predictions
from imgclf.models.objective import Objective, balanced_class_weights


def test_balanced_weights_are_sklearns_formula():
    targets = np.array([0] * 8 + [1] * 2)
    np.testing.assert_allclose(balanced_class_weights(targets, 2), [10 / (2 * 8), 10 / (2 * 2)])


def test_sigmoid_objective_matches_two_way_softmax_semantics():
    objective = Objective(2, sigmoid=True)
    probs = objective.probabilities(torch.tensor([[0.0], [2.0]]))
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(torch.tensor([0.0, 2.0])).double())
    torch.testing.assert_close(probs.sum(1), torch.ones(2, dtype=torch.double))
    loss = objective.loss(torch.tensor([[2.0]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(-np.log(1 / (1 + np.exp(-2.0))), rel=1e-6)


def test_class_weights_scale_the_loss_of_each_class():
    logits, targets = torch.zeros(2, 3), torch.tensor([0, 1])
    weighted = Objective(3, class_weights=torch.tensor([1.0, 3.0, 1.0])).loss(logits, targets)
    assert weighted.item() == pytest.approx(np.log(3))  # equal logits: every sample costs log 3
    for sigmoid in (False, True):
        obj = Objective(2, sigmoid=sigmoid, class_weights=torch.tensor([1.0, 4.0]))
        out = obj.loss(torch.tensor([[0.5, -0.5]]) if not sigmoid else torch.tensor([[0.5]]), torch.tensor([1]))
        assert torch.isfinite(out)


def make_predictions(n=60, k=3, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), size=n)
    true = np.where(rng.uniform(size=n) < 0.7, probs.argmax(1), rng.integers(0, k, n))
    return Predictions([f"{i}.png" for i in range(n)], [f"c{j}" for j in range(k)], true, probs)


def test_metrics_match_scikit_learn():
    preds = make_predictions()
    m = compute_metrics(preds)
    y, p = preds.true, preds.probs.argmax(1)
    assert m["accuracy"] == skm.accuracy_score(y, p)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert m["roc_auc_ovr"] == pytest.approx(skm.roc_auc_score(y, preds.probs, multi_class="ovr"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p).tolist()
    assert m["per_class"]["c1"]["support"] == int((y == 1).sum())


@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_probe_s_selection_scores_are_compute_metrics_own(k):
    preds = make_predictions(n=50, k=k, seed=k)
    preds.true[preds.true == k - 1] = 0  # a class absent from the labels: F1 counts it as 0, log loss keeps it
    m = compute_metrics(preds)
    assert f1_and_log_loss(preds.true, preds.probs) == (m["f1_macro"], m["log_loss"])


def test_binary_metrics_for_a_named_positive_class():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6]])
    preds = Predictions(list("abcde"), ["normal", "pneumonia"], np.array([0, 1, 1, 0, 1]), probs)
    m = compute_metrics(preds, positive_class="pneumonia")
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(1 / 2)
    flipped = compute_metrics(preds, positive_class="normal")
    assert flipped["sensitivity"] == m["specificity"]


def test_auc_is_none_when_a_class_is_absent():
    preds = make_predictions()
    preds.true[:] = 0
    assert compute_metrics(preds)["roc_auc_ovr"] is None


def test_predictions_csv_round_trip(tmp_path):
    preds = make_predictions()
    preds.to_csv(tmp_path / "p.csv")
    back = Predictions.from_csv(tmp_path / "p.csv")
    assert back.paths == preds.paths and back.classes == preds.classes
    np.testing.assert_array_equal(back.true, preds.true)
    np.testing.assert_array_equal(back.probs, preds.probs)


def _edit_csv(path, change):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(change(lines)) + "\n")


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda lines: [lines[0], lines[1] + ",0.5", *lines[2:]], "line 2: "),  # a field too many
    (lambda lines: [lines[0], lines[1].rsplit(",", 1)[0], *lines[2:]], "line 2: "),  # one too few
    (lambda lines: [lines[0], lines[1].rsplit(",", 1)[0] + ",lots", *lines[2:]], "line 2: could not convert"),
    (lambda lines: [lines[0], lines[1].rsplit(",", 1)[0] + ",nan", *lines[2:]], "not a finite number"),
    (lambda lines: [*lines[:3], ",".join(f if k != 2 else "zebra" for k, f in enumerate(lines[3].split(","))),
                    *lines[4:]], "line 4: 'zebra' is not one of its classes"),  # its predicted label
    (lambda lines: [lines[0].replace("prob_c2", "prob_d2"), *lines[1:]],
     "prob_ column 3 is 'd2', the run's class 3 is 'c2'"),
    (lambda lines: [lines[0], "x" * (4 << 20), *lines[1:]], "a line over 4,194,304 characters"),
    (lambda lines: ["x,y,z", *lines[1:]], "no predictions header"),
    (lambda lines: [], "no predictions header"),
])
def test_a_damaged_predictions_csv_is_one_line_naming_the_file(tmp_path, change, fragment):
    preds = make_predictions()
    preds.to_csv(tmp_path / "p.csv")
    _edit_csv(tmp_path / "p.csv", change)
    with pytest.raises(RunDirError) as err:
        Predictions.from_csv(tmp_path / "p.csv", preds.classes)
    assert fragment in str(err.value) and "p.csv" in str(err.value) and "\n" not in str(err.value)


def test_a_predictions_csv_with_too_many_class_columns_is_refused(tmp_path):
    (tmp_path / "p.csv").write_text("path,predicted_label," + ",".join(f"prob_{k}" for k in range(10_001)) + "\n")
    with pytest.raises(RunDirError, match="10,003 columns, more than 10,000 classes'"):
        Predictions.from_csv(tmp_path / "p.csv")
    (tmp_path / "p.csv").write_text("path," * 20_000 + "\n")
    with pytest.raises(RunDirError, match="20,001 columns, more than 10,000 classes'"):
        Predictions.from_csv(tmp_path / "p.csv")
