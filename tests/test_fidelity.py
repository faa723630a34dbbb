"""Label-free fidelity metrics against small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxhq.errors import ConfigError, DataError
from onnxhq.fidelity import METRICS, ctc_greedy, measure, meets, parse_target


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_identical_class_outputs_agree_fully_with_zero_kl():
    logits = np.random.default_rng(0).normal(size=(5, 7))
    for given in (logits, softmax(logits)):
        m = measure("classes", given, given)
        assert m == {"agreement": 1.0, "kl": 0.0}


def test_kl_and_agreement_by_hand():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    q = np.array([[0.25, 0.75], [0.6, 0.4]])
    m = measure("classes", p, q)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl1 = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert m["kl"] == pytest.approx((kl0 + kl1) / 2, rel=1e-12)
    # argmax of [0.5, 0.5] is class 0, of [0.25, 0.75] class 1: one of two positions agrees.
    assert m["agreement"] == 0.5


def test_kl_from_logits_equals_kl_from_probabilities():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 3, 6)), rng.normal(size=(4, 3, 6))
    from_logits = measure("classes", a, b, logits=True)
    from_probs = measure("classes", softmax(a), softmax(b))
    assert from_logits["kl"] == pytest.approx(from_probs["kl"], rel=1e-9)
    assert from_logits["agreement"] == from_probs["agreement"]


def test_segmentation_class_axis_1_counts_every_pixel():
    a = np.zeros((1, 3, 2, 2))
    a[0, 0] = 1.0  # class 0 wins at every pixel
    b = a.copy()
    b[0, 2, 1, 1] = 5.0  # class 2 wins at one of four pixels
    m = measure("classes", a, b, axis=1, logits=True)
    assert m["agreement"] == 0.75
    assert "sequence" not in m


def test_accuracy_uses_the_compressed_top1():
    a = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    b = np.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    m = measure("classes", a, b, labels=np.array([0, 1, 1]))
    assert m["accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(DataError, match=r"labels have shape \(2,\); this output needs \(3,\)"):
        measure("classes", a, b, labels=np.array([0, 1]))


def one_hot(path: list[int], classes: int = 4) -> np.ndarray:
    return np.eye(classes)[path]


def test_ctc_greedy_merges_repeats_then_drops_blanks():
    # "a a _ a b b _" -> a, a, b: the blank separates the two a's.
    scores = one_hot([1, 1, 0, 1, 2, 2, 0])[None]
    assert ctc_greedy(scores) == [(1, 1, 2)]
    assert ctc_greedy(scores, blank=3) == [(1, 0, 1, 2, 0)]


def test_sequence_share_of_identical_decodings():
    same_text = (one_hot([1, 0, 2, 2]), one_hot([1, 1, 0, 2]))  # both decode to (1, 2)
    different = (one_hot([3, 0, 3, 0]), one_hot([3, 3, 3, 0]))  # (3, 3) against (3,)
    a = np.stack([same_text[0], different[0]])
    b = np.stack([same_text[1], different[1]])
    m = measure("classes", a, b)
    assert m["sequence"] == 0.5
    assert m["agreement"] == pytest.approx(5 / 8)  # 2 of 4 positions, then 3 of 4
    with pytest.raises(ConfigError, match="blank class 9 is out of range for 4 classes"):
        measure("classes", a, b, blank=9)


def test_bernoulli_iou_and_max_error():
    a = np.array([[[0.9, 0.8], [0.1, 0.2]], [[0.1, 0.1], [0.1, 0.1]]])[:, None]
    b = np.array([[[0.9, 0.2], [0.7, 0.2]], [[0.2, 0.3], [0.0, 0.1]]])[:, None]
    m = measure("bernoulli", a, b)
    # sample 0: {0, 1} against {0, 2}: IoU 1/3; sample 1: both empty, counts as 1.
    assert m["iou"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert m["max_abs_error"] == pytest.approx(0.6)


def test_bernoulli_logits_are_mapped_through_the_sigmoid():
    a = np.array([[3.0, -3.0]])
    b = np.array([[-1.0, -3.0]])
    m = measure("bernoulli", a, b)
    assert m["iou"] == 0.0
    assert m["max_abs_error"] == pytest.approx(1 / (1 + math.exp(-3)) - 1 / (1 + math.exp(1)))


def test_real_cosine_of_scaled_outputs_is_one_and_sqnr_by_hand():
    a = np.random.default_rng(2).normal(size=(6, 4))
    m = measure("real", a, 3.0 * a)
    assert m["cosine"] == pytest.approx(1.0) and m["cosine_min"] == pytest.approx(1.0)
    # error = 2a: power ratio 1/4 -> -6.02 dB
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(1 / 4))
    assert measure("real", a, a)["sqnr_db"] == math.inf


def test_real_cosine_mean_and_min():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    m = measure("real", a, b)
    assert m["cosine_min"] == 0.0  # orthogonal
    assert m["cosine"] == pytest.approx(2 / 3)  # 0, 1 and two zero vectors counted as 1


def test_returned_keys_are_those_listed_in_metrics():
    a = np.random.default_rng(3).random((2, 3, 4))
    assert set(measure("classes", a, a, labels=np.zeros((2, 3)))) == set(METRICS["classes"])
    assert set(measure("bernoulli", a, a)) == set(METRICS["bernoulli"])
    assert set(measure("real", a, a)) == set(METRICS["real"])


def test_meets_direction_per_metric():
    m = {"agreement": 0.99, "kl": 0.02, "sqnr_db": 30.0}
    assert meets(m, "agreement=0.99") and not meets(m, "agreement=0.995")
    assert meets(m, "kl=0.05") and not meets(m, "kl=0.01")
    assert meets(m, "sqnr=30") and parse_target("sqnr=30") == ("sqnr_db", 30.0)
    with pytest.raises(ConfigError, match="names 'iou', which this output kind does not measure"):
        meets(m, "iou=0.9")
    with pytest.raises(ConfigError, match="is not METRIC=VALUE"):
        parse_target("accuracy>0.9")
    with pytest.raises(ConfigError, match="'high' is not a number"):
        parse_target("cosine=high")


def test_bad_inputs_are_refused_with_the_shapes():
    with pytest.raises(DataError, match=r"shape \(2, 4\), the original \(2, 3\)"):
        measure("real", np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="unknown output kind 'boxes'"):
        measure("boxes", np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="class axis 0 is out of range"):
        measure("classes", np.zeros((2, 3)), np.zeros((2, 3)), axis=0)
