import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import f1_score

from imgclf.errors import ConfigError
from imgclf.evaluation import uncertainty
from imgclf.evaluation.metrics import compute_metrics, expected_calibration_error, reliability
from imgclf.evaluation.operating import choose_threshold
from imgclf.evaluation.predictions import Predictions
from imgclf.evaluation.uncertainty import bootstrap_auc, confidence_intervals, resampled_auc, wilson


def scores(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.3
    score = np.clip(rng.normal(np.where(positive, 0.65, 0.35), 0.18), 0, 1)
    return positive, score


def test_sensitivity_rule_keeps_the_target_with_the_highest_threshold():
    positive, score = scores()
    t = choose_threshold(positive, score, "sensitivity:0.95")
    assert (score[positive] >= t).mean() >= 0.95
    higher = np.unique(score[score > t]).min()
    assert (score[positive] >= higher).mean() < 0.95  # the next threshold up loses the target


def test_youden_and_max_f1_are_the_best_over_every_candidate_threshold():
    positive, score = scores()
    candidates = np.unique(score)
    sens = np.array([(score[positive] >= c).mean() for c in candidates])
    spec = np.array([(score[~positive] < c).mean() for c in candidates])
    youden = choose_threshold(positive, score, "youden")
    best_j = (sens + spec - 1).max()
    assert (score[positive] >= youden).mean() + (score[~positive] < youden).mean() - 1 == pytest.approx(best_j)
    f1s = [f1_score(positive, score >= c) for c in candidates]
    assert f1_score(positive, score >= choose_threshold(positive, score, "max_f1")) == pytest.approx(max(f1s))
    assert choose_threshold(positive, score, "argmax") is None


def test_a_threshold_needs_both_classes_in_validation():
    with pytest.raises(ConfigError, match="both classes"):
        choose_threshold(np.ones(5, bool), np.linspace(0, 1, 5), "youden")


def test_thresholded_decisions_survive_the_csv_and_drive_the_metrics(tmp_path):
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.8, 0.2]])
    preds = Predictions(["a", "b", "c", "d"], ["neg", "pos"], np.array([0, 1, 1, 0]), probs).at_threshold(0.25, 1)
    assert preds.pred.tolist() == [0, 1, 1, 0]  # b is positive at 0.25 though argmax says negative
    preds.to_csv(tmp_path / "p.csv")
    back = Predictions.from_csv(tmp_path / "p.csv")
    assert back.pred.tolist() == [0, 1, 1, 0]
    m = compute_metrics(back)
    assert m["sensitivity"] == 1.0 and m["accuracy"] == 1.0
    assert compute_metrics(back.at_threshold(None, 1))["sensitivity"] == 0.5


def test_wilson_interval_matches_the_textbook_value_and_stays_in_bounds():
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 12)[0] == 0.0 and 0 < wilson(0, 12)[1] < 0.3
    assert wilson(12, 12)[1] == 1.0 and wilson(0, 0) is None


def test_bootstrap_auc_is_seeded_and_narrows_with_more_images():
    positive, score = scores(100)
    probs = np.stack([1 - score, score], 1)
    y = positive.astype(int)
    first = bootstrap_auc(y, probs, 300, seed=1)
    assert first == bootstrap_auc(y, probs, 300, seed=1) and first != bootstrap_auc(y, probs, 300, seed=2)
    big_pos, big_score = scores(1600)
    wide = bootstrap_auc(big_pos.astype(int), np.stack([1 - big_score, big_score], 1), 300, seed=1)
    assert wide[1] - wide[0] < first[1] - first[0]
    assert bootstrap_auc(np.zeros(5, int), probs[:5], 100, seed=1) is None  # one class: no AUC
    two = np.array([[0.8, 0.2], [0.3, 0.7]])  # one image per class: half the resamples miss one
    assert [bootstrap_auc(np.array([0, 1]), two, 1, seed) for seed in range(6)].count(None) >= 2


def test_resampled_auc_equals_scikit_learn_weighted_by_the_draw_counts_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.random(50) < 0.4
    counts = rng.integers(0, 4, (6, 50))  # how often each resample drew each image; 0: not drawn
    for score in (rng.integers(0, 6, 50) / 5, rng.random(50)):  # many ties, then none
        expected = [roc_auc_score(labels, score, sample_weight=row) for row in counts]
        np.testing.assert_allclose(resampled_auc(counts, labels, score), expected, rtol=1e-12)
    one_class = np.where(labels, 0, counts[0])  # draws only negatives: no AUC
    assert np.isnan(resampled_auc(one_class[None], labels, rng.random(50))).all()


def test_bootstrap_auc_in_chunks_draws_and_scores_as_in_one(monkeypatch):
    positive, score = scores(120)
    probs = np.stack([1 - score, score], 1)
    whole = bootstrap_auc(positive.astype(int), probs, 250, seed=4)
    monkeypatch.setattr(uncertainty, "CHUNK_ELEMENTS", 7 * 120)  # 7 resamples a chunk, the last one short
    assert bootstrap_auc(positive.astype(int), probs, 250, seed=4) == whole


def test_bootstrap_auc_memory_stays_bounded_on_a_large_test_set():
    positive, score = scores(20000)
    tracemalloc.start()
    try:
        bootstrap_auc(positive.astype(int), np.stack([1 - score, score], 1), 300, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 300 resamples of 20,000 images drawn at once would hold 48 MB per int64 array, several of them
    assert peak < 64 * 2**20


def test_intervals_contain_their_point_estimates():
    positive, score = scores(300)
    preds = Predictions([str(i) for i in range(300)], ["no", "yes"], positive.astype(int),
                        np.stack([1 - score, score], 1))
    m, ci = compute_metrics(preds), confidence_intervals(preds, None, 200, seed=0)
    for name, value in (("accuracy", m["accuracy"]), ("sensitivity", m["sensitivity"]),
                        ("specificity", m["specificity"]), ("roc_auc", m["roc_auc_ovr"])):
        assert ci[name][0] <= value <= ci[name][1], name
    three = Predictions(["a", "b", "c"], ["x", "y", "z"], np.array([0, 1, 2]), np.eye(3))
    assert set(confidence_intervals(three, None, 0, 0)["per_class"]) == {"x", "y", "z"}


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20000)
    calibrated = rng.random(20000) < confidence
    assert expected_calibration_error(confidence, calibrated) < 0.02
    overconfident = rng.random(20000) < confidence - 0.3
    assert expected_calibration_error(confidence, overconfident) == pytest.approx(0.3, abs=0.02)
    rows = reliability(confidence, overconfident)
    weighted = sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / 20000
    assert weighted == pytest.approx(expected_calibration_error(confidence, overconfident))
