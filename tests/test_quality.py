"""Label-free quality that a detector cannot fool: per-output comparison, detection F1, pixel agreement.

The detector is a real (toy) ONNX model with YOLOv8's output layout, quantized for real by
onnxruntime's static int8 quantizer, which gives the concat of box coordinates (0-320) and class
scores (0-1) one scale: the boxes survive, the class scores do not. One cosine of everything
flattened calls that 0.99999; the automatic metric does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.cli.main import main
from orchestrator.config.profile import Profile
from orchestrator.models.agreement import (
    DetectionSettings,
    detection_f1,
    detection_layout,
    per_output_cosine,
    pixel_agreement,
)
from orchestrator.models.outputs import onnx_outputs
from orchestrator.models.ownmodel import OwnModelTask
from orchestrator.search.trial import accuracy_rejection
from tests.helpers import detector
from tests.helpers.own_models import image_samples


def _head(dets: list[tuple[float, float, float, float, int, float]], anchors: int = 16, classes: int = 3) -> np.ndarray:
    """A (1, 4 + classes, anchors) head with the given (cx, cy, w, h, class, score) detections, the rest empty."""
    head = np.zeros((1, 4 + classes, anchors), dtype=np.float32)
    head[0, :4, :] = 5.0  # empty anchors: tiny boxes with no score
    for i, (cx, cy, w, h, cls, score) in enumerate(dets):
        head[0, :4, i] = (cx, cy, w, h)
        head[0, 4 + cls, i] = score
    return head


def test_detection_f1_against_fp32_on_a_known_case() -> None:
    fp32 = _head([(50, 50, 20, 20, 0, 0.9), (150, 150, 30, 30, 1, 0.8), (250, 60, 40, 20, 2, 0.7)])
    # the first kept (a little shifted), the second's class flipped, the third lost, one spurious box found
    cand = _head([(52, 50, 20, 20, 0, 0.85), (150, 150, 30, 30, 2, 0.8), (100, 250, 20, 20, 1, 0.6)])
    f1, counts = detection_f1(cand, fp32, "channels-first")
    assert counts == {"matched": 1, "candidate": 3, "fp32": 3}
    assert f1 == pytest.approx(2 * 1 / 6)
    assert detection_f1(fp32, fp32, "channels-first")[0] == 1.0
    # NMS: a duplicate of the first box (IoU > 0.45) is suppressed, so fp32 against itself-plus-duplicate agrees
    dup = _head([(50, 50, 20, 20, 0, 0.9), (51, 50, 20, 20, 0, 0.88), (150, 150, 30, 30, 1, 0.8),
                 (250, 60, 40, 20, 2, 0.7)])
    assert detection_f1(dup, fp32, "channels-first") == (1.0, {"matched": 3, "candidate": 3, "fp32": 3})
    # the score threshold is a setting: at 0.75 the third detection is gone from both
    strict = DetectionSettings(score_threshold=0.75)
    assert detection_f1(fp32, fp32, "channels-first", strict)[1]["fp32"] == 2
    # the same head laid out (batch, anchors, 4 + classes) reads the same
    assert detection_f1(cand.transpose(0, 2, 1), fp32.transpose(0, 2, 1), "channels-last")[0] == pytest.approx(1 / 3)
    assert detection_f1(np.full_like(cand, np.nan), fp32, "channels-first")[0] == 0.0


def test_detector_shapes_are_recognised_only_when_the_values_agree() -> None:
    head = _head([(50, 50, 20, 20, 0, 0.9)])
    assert detection_layout((1, 7, 16)) == "channels-first" and detection_layout((1, 16, 7)) == "channels-last"
    assert detection_layout((1, 7, 16), head) == "channels-first"
    hidden = np.random.default_rng(0).normal(size=(1, 7, 16))  # a hidden state: negative "scores"
    assert detection_layout((1, 7, 16), hidden) is None
    assert detection_layout(("batch", "sequence", 384)) is None  # symbolic axes: not a detection head
    assert detection_layout((1, 384, 384)) is None


def test_each_output_is_compared_in_its_own_scale() -> None:
    rng = np.random.default_rng(0)
    big = rng.normal(100.0, 50.0, size=(8, 64))
    small = rng.normal(0.0, 0.01, size=(8, 4))
    broken = -small  # the small output's every value wrong
    flat = lambda a, b: float(np.mean([np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)  # noqa: E731
                                       for x, y in zip(np.hstack(a), np.hstack(b))]))
    assert flat([big, broken], [big, small]) > 0.9999  # what one cosine of everything flattened said
    score, parts = per_output_cosine([big, broken], [big, small], ["boxes", "scores"])
    assert parts["boxes"] == pytest.approx(1.0) and parts["scores"] == pytest.approx(-1.0) and score == parts["scores"]
    # channels of one output with different scales are standardised: a broken small channel counts
    head = np.concatenate([rng.uniform(0, 320, size=(8, 4, 50)), rng.uniform(0, 1, size=(8, 3, 50))], axis=1)
    flipped = head.copy()
    flipped[:, 4:] = 1.0 - head[:, 4:]
    score, parts = per_output_cosine([flipped], [head], ["output0"])
    assert list(parts) == ["output0 (7 channels standardised)"] and score < 0.6
    assert per_output_cosine([head], [head])[0] == pytest.approx(1.0)
    seg = rng.normal(size=(2, 5, 8, 8))
    assert pixel_agreement(seg, seg) == 1.0 and pixel_agreement(-seg, seg) < 0.5


@pytest.fixture(scope="module")
def toy_detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(fp32 ONNX, samples, int8 ONNX): the int8 one made by onnxruntime's static quantizer on the samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    folder = tmp_path_factory.mktemp("detector")
    model, samples = detector.export(folder / "det.onnx"), detector.samples(folder / "samples.npz")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{"features": x[None]} for x in np.load(samples)["features"][:24]])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(model), str(folder / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    return model, samples, folder / "int8.onnx"


def test_an_int8_detector_that_breaks_its_class_scores_is_rejected_though_a_flat_cosine_passes(toy_detector) -> None:
    model, samples, int8 = toy_detector
    task = OwnModelTask(str(model), str(samples))
    assert task.quality_metric == "detection"  # recognised from the output's shape and fp32's values
    data = task.load_data(0)
    reference = data["eval"].labels
    got = onnx_outputs(int8.read_bytes(), task, data["eval"])
    g, r = got[0].reshape(len(got[0]), -1), reference[0].reshape(len(reference[0]), -1)
    flat = float(np.mean((g * r).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(r, axis=1)))
    assert flat > 0.999  # the old metric: feasible under a 1-point budget
    f1 = task.score(got, reference)
    assert f1 < 0.9, f1  # detections lost or with the wrong class
    assert task.score(reference, reference) == 1.0
    prof = Profile.model_validate({"name": "p", "hardware": {"arch": "x86_64", "cpu": "x", "cores": 1, "memory_mb": 1},
                                   "objective": {"metric": "latency_p50"}, "constraints": {"max_accuracy_drop": 1.0},
                                   "power": {"idle_watts": 1, "active_watts": 2, "source": "t"}})
    assert "detection" in accuracy_rejection(f1, 1.0, prof, task.quality_metric)
    described = task.describe()
    assert described["quality_metric"] == "detection" and "matched to fp32's by class at IoU >= 0.5" in \
        described["quality_compares"]
    # asked for the per-output cosine instead, the channels are standardised and it is rejected too
    cos = OwnModelTask(str(model), str(samples), quality="cosine")
    data = cos.load_data(0)
    assert cos.score(got, data["eval"].labels) < 0.99
    assert "output0 (7 channels, each standardised by fp32's mean and spread)" in cos.describe()["quality_compares"]
    # a worker rebuilds the task from its spec without detecting again, with the driver's settings
    spec = task.spec()
    assert spec["quality"] == "detection" and OwnModelTask.from_spec(spec).quality_metric == "detection"


def test_an_embedding_model_keeps_the_plain_cosine(tmp_path) -> None:
    """One output of one kind of quantity (no channel scales apart): the cosine as before."""
    task = OwnModelTask("tests.helpers.own_models:tiny_bert",
                        str(__import__("tests.helpers.own_models", fromlist=["x"]).token_samples(tmp_path / "t.npz")))
    assert task.quality_metric == "cosine"
    task.load_data(0)
    assert task.describe()["quality_compares"].endswith("output (as it is)")


def _profile(tmp_path: Path, params: dict) -> Path:
    data = {
        "name": "taylor-test", "hardware": {"arch": "x86_64", "cpu": "any", "cores": 2, "memory_mb": 4096},
        "constraints": {"max_accuracy_drop": 5.0}, "objective": {"metric": "latency_p50"},
        "search": {"techniques": ["prune-structured"], "trials": 1, "max_pipeline_length": 1, "params": params},
        "power": {"idle_watts": 5, "active_watts": 10, "source": "test"},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_taylor_importance_without_labels_is_refused_up_front_with_one_line(tmp_path, capsys) -> None:
    samples = image_samples(tmp_path / "images.npz")
    profile = _profile(tmp_path, {"prune-structured": {"importance": "taylor"}})
    code = main(["--profile", str(profile), "--model", "tests.helpers.own_models:small_cnn", "--inputs", str(samples),
                 "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert "search.params.prune-structured.importance" in err[-1] and "taylor needs labelled samples" in err[-1]
    assert not list((tmp_path / "runs").glob("*"))  # refused before a run folder was made


def test_taylor_is_left_out_of_an_unlabeled_search_and_works_with_labels(tmp_path) -> None:
    from orchestrator.config.profile import load_profile
    from orchestrator.hooks.manager import get_plugin_manager
    from orchestrator.search.fitting import fit_to_labels
    from orchestrator.search.space import allowed_techniques

    loaded = load_profile(_profile(tmp_path, {"prune-structured": {"importance": ["l1", "taylor"]}}))
    techniques = allowed_techniques(loaded, get_plugin_manager())
    unlabeled = OwnModelTask("tests.helpers.own_models:small_cnn", str(image_samples(tmp_path / "u.npz")))
    (fitted,) = fit_to_labels(loaded, techniques, unlabeled)
    assert fitted.search_space["importance"].values == ("l1",)
    rows = dict(np.load(tmp_path / "u.npz"))
    np.savez(tmp_path / "l.npz", **rows, labels=np.arange(len(rows["input"])) % 10)
    labeled = OwnModelTask("tests.helpers.own_models:small_cnn", str(tmp_path / "l.npz"))
    (kept,) = fit_to_labels(loaded, techniques, labeled)
    assert kept.search_space["importance"].values == ("l1", "taylor")
