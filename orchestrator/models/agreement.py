"""Label-free quality: how closely a candidate's outputs agree with the fp32 model's, where it matters.

A model brought without labels is scored against its own fp32 outputs on held-out samples. One
cosine of every output flattened is fooled whenever outputs carry quantities of different scales:
a detector's box coordinates (0-320) swamp its class scores (0-1), so an int8 detector that
loses half its detections still scores 0.998. So (pure numpy, no torch):

- `per_output_cosine`: each output compared in its own scale; an output whose channels (axis 1)
  differ in scale by `HETEROGENEOUS` or more has each channel standardised by fp32's mean and
  spread first; the worst output is the score, and every part's score is reported.
- `detection_f1`: a YOLO-style head (boxes + class scores per anchor) decoded as its own package
  decodes it (score threshold, class-agnostic NMS), matched to fp32's detections by class and
  IoU, F1 pooled over the samples.
- `pixel_agreement`: a segmentation map's arg-max class per pixel, the share equal to fp32's.
- `detection_layout`: whether an output is detector-shaped (shapes, then fp32's values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

#: Channels whose spreads differ by this factor or more carry different quantities: each gets its own scale.
HETEROGENEOUS = 10.0
#: A channel's spread is floored at this share of the output's largest, so a constant channel adds no noise.
FLOOR = 1e-3


@dataclass(frozen=True)
class DetectionSettings:
    """How detections are decoded and matched (the profile's `model.detection`)."""

    score_threshold: float = 0.25
    nms_iou: float = 0.45
    match_iou: float = 0.5
    max_detections: int = 300


def _rows(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def channel_scales(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, spread) per channel (axis 1) of a reference output whose channels differ in scale, else None."""
    if ref.ndim < 3 or ref.shape[1] < 2:
        return None
    moved = np.moveaxis(ref, 1, 0).reshape(ref.shape[1], -1)
    spread = moved.std(axis=1)
    top = float(spread.max())
    if top <= 0 or not np.all(np.isfinite(spread)):
        return None
    floor = FLOOR * top
    if top / max(float(spread.min()), floor) < HETEROGENEOUS:
        return None
    return moved.mean(axis=1), np.maximum(spread, floor)


def _cosine(got: np.ndarray, ref: np.ndarray) -> float:
    g, r = got.reshape(len(got), -1), ref.reshape(len(ref), -1)
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
    both_zero = (np.linalg.norm(g, axis=1) == 0) & (np.linalg.norm(r, axis=1) == 0)
    per = np.where(both_zero, 1.0, (g * r).sum(axis=1) / np.maximum(norms, 1e-12))
    return float(per.mean())


def per_output_cosine(outputs: Sequence[Any], reference: Sequence[Any],
                      names: Sequence[str] | None = None) -> tuple[float, dict[str, float]]:
    """(worst part's score, {part: score}): each output's mean per-sample cosine to fp32's, in its own scale.

    An output whose channels differ in scale (`channel_scales`) is compared after standardising
    each channel with fp32's mean and spread, so every channel counts alike; its part is named
    "NAME (C channels standardised)". A non-finite output scores 0.
    """
    names = list(names or [f"output{i}" for i in range(len(reference))])
    parts: dict[str, float] = {}
    for name, got, ref in zip(names, outputs, reference):
        got, ref = _rows(got), _rows(ref)
        if got.shape != ref.shape or not np.all(np.isfinite(got)):
            parts[name] = 0.0
            continue
        scales = channel_scales(ref)
        if scales is None:
            parts[name] = _cosine(got, ref)
            continue
        mean, spread = scales
        shape = (1, -1) + (1,) * (ref.ndim - 2)
        mean, spread = mean.reshape(shape), spread.reshape(shape)
        parts[f"{name} ({ref.shape[1]} channels standardised)"] = _cosine((got - mean) / spread, (ref - mean) / spread)
    return (min(parts.values()) if parts else 0.0), parts


# ----------------------------------------------------------------------------------- detection


def detection_layout(shape: Sequence[Any], values: Any | None = None) -> str | None:
    """"channels-first" for (batch, 4 + classes, anchors), "channels-last" for (batch, anchors, 4 + classes),
    or None: not a YOLO-style detection head.

    Shapes first (3-D, static, the anchors at least twice the 4 + classes, classes 1..1024); then,
    when fp32's `values` are given, they must look like it: class scores within [0, 1] (sigmoid
    outputs) and box coordinates reaching beyond 1 (pixels).
    """
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        return None
    a, b = int(shape[1]), int(shape[2])
    layout = "channels-first" if 5 <= a <= 1028 and b >= 2 * a else \
        "channels-last" if 5 <= b <= 1028 and a >= 2 * b else None
    if layout is None or values is None:
        return layout
    v = _rows(values)
    if v.ndim != 3 or not np.all(np.isfinite(v)):
        return None
    boxes, scores = (v[:, :4, :], v[:, 4:, :]) if layout == "channels-first" else (v[:, :, :4], v[:, :, 4:])
    if scores.min() < 0 or scores.max() > 1 or np.abs(boxes).max() <= 1.0:
        return None
    return layout


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = boxes.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(box) + area(others) - inter, 1e-12)


def decode(sample: np.ndarray, layout: str, settings: DetectionSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy, scores, classes) of one sample's head output: threshold, then class-agnostic NMS."""
    rows = sample.T if layout == "channels-first" else sample  # (anchors, 4 + classes)
    classes = rows[:, 4:].argmax(axis=1)
    scores = rows[:, 4:].max(axis=1)
    keep = np.flatnonzero(scores >= settings.score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")][: 30 * settings.max_detections]
    boxes = _xyxy(rows[keep, :4])
    chosen: list[int] = []
    alive = np.ones(len(keep), dtype=bool)
    for i in range(len(keep)):
        if not alive[i]:
            continue
        chosen.append(i)
        if len(chosen) >= settings.max_detections:
            break
        alive[i + 1:] &= _iou(boxes[i], boxes[i + 1:]) <= settings.nms_iou
    idx = np.asarray(chosen, dtype=int)
    return boxes[idx], scores[keep][idx], classes[keep][idx]


def _matches(got: tuple[np.ndarray, ...], ref: tuple[np.ndarray, ...], match_iou: float) -> int:
    """Greedy one-to-one matches, highest-scoring detection first: same class, IoU >= match_iou."""
    gb, _, gc = got
    rb, _, rc = ref
    used = np.zeros(len(rb), dtype=bool)
    found = 0
    for box, cls in zip(gb, gc):  # already in descending score order
        if not len(rb):
            break
        iou = np.where((rc == cls) & ~used, _iou(box, rb), -1.0)
        j = int(iou.argmax())
        if iou[j] >= match_iou:
            used[j] = True
            found += 1
    return found


def detection_f1(output: Any, reference: Any, layout: str,
                 settings: DetectionSettings | None = None) -> tuple[float, dict[str, int]]:
    """(F1 of the candidate's detections against fp32's, counts), pooled over the samples.

    Both are decoded alike (`decode`); a candidate detection counts when it matches one of fp32's
    of the same class at IoU >= `match_iou`. Samples where neither detects anything agree (F1 1.0
    when no sample has a detection). A non-finite output scores 0.
    """
    settings = settings or DetectionSettings()
    got, ref = _rows(output), _rows(reference)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return 0.0, {"matched": 0, "candidate": 0, "fp32": 0}
    matched = n_got = n_ref = 0
    for g, r in zip(got, ref):
        dg, dr = decode(g, layout, settings), decode(r, layout, settings)
        matched += _matches(dg, dr, settings.match_iou)
        n_got, n_ref = n_got + len(dg[0]), n_ref + len(dr[0])
    counts = {"matched": matched, "candidate": n_got, "fp32": n_ref}
    return (1.0 if n_got + n_ref == 0 else 2.0 * matched / (n_got + n_ref)), counts


# -------------------------------------------------------------------------------- segmentation


def segmentation_shaped(shape: Sequence[Any], name: str) -> bool:
    """A (batch, classes, H, W) output named like a segmentation map (seg, mask, logits, classes)."""
    if len(shape) != 4 or not isinstance(shape[1], (int, np.integer)):
        return False
    return 2 <= int(shape[1]) <= 1024 and any(w in name.lower() for w in ("seg", "mask", "logit", "class"))


def pixel_agreement(output: Any, reference: Any) -> float:
    """Share of pixels whose arg-max class (axis 1) is fp32's."""
    got, ref = _rows(output), _rows(reference)
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return 0.0
    return float((got.argmax(axis=1) == ref.argmax(axis=1)).mean())


# ------------------------------------------------------------------------- choosing and scoring


def is_distribution(values: Any) -> bool:
    """Whether an output's rows over its last axis are probability distributions over 2 or more classes (a
    softmax's: non-negative, each summing to 1)."""
    values = np.asarray(values, dtype=np.float64)
    return values.ndim >= 2 and values.shape[-1] >= 2 and bool((values >= 0).all()) \
        and bool(np.allclose(values.sum(axis=-1), 1.0, atol=1e-3))


def _class_probabilities(fp32_probe: Callable[[], Any]) -> bool:
    """Whether fp32's rows of a 2-D output are probability distributions (`is_distribution`)."""
    try:
        return is_distribution(fp32_probe())
    except Exception:  # noqa: BLE001 - a model that cannot run here fails later with its own message
        return False


def auto_quality(outputs: Sequence[Any], fp32_probe: Callable[[], Any]) -> str:
    """The label-free metric for a model's output specs (name, shape): top1 for classifier logits (by name) or
    probabilities (fp32's rows sum to 1), segmentation
    for a segmentation map, detection for a YOLO-style head whose fp32 values (`fp32_probe()`) agree, else cosine."""
    out = outputs[0]
    classifier = any(word in out.name.lower() for word in ("logit", "prob", "softmax", "class")) or \
        (len(out.shape) == 2 and out.shape[1] == "classes")
    if classifier and len(out.shape) == 2:
        return "top1"
    if len(out.shape) == 2 and _class_probabilities(fp32_probe):
        return "top1"  # unnamed, but its rows are probabilities over classes: a softmax classifier
    if len(outputs) == 1 and segmentation_shaped(out.shape, out.name):
        return "segmentation"
    if len(outputs) == 1 and detection_layout(out.shape):
        try:
            values = np.asarray(fp32_probe())
        except Exception:  # noqa: BLE001 - a model that cannot run here fails later with its own message
            return "cosine"
        if detection_layout(values.shape, values) is not None:
            return "detection"
    return "cosine"


def agreement_score(metric: str, outputs: Sequence[Any], reference: Sequence[Any], names: Sequence[str],
                    layout: str | None = None, settings: DetectionSettings | None = None) -> float:
    """The label-free quality `metric` of `outputs` against fp32's `reference` (1.0 = the same)."""
    if metric == "top1":
        return float((np.asarray(outputs[0]).argmax(axis=-1) == np.asarray(reference[0]).argmax(axis=-1)).mean())
    if metric == "segmentation":
        return pixel_agreement(outputs[0], reference[0])
    if metric == "detection":
        layout = layout or detection_layout(np.asarray(reference[0]).shape) or "channels-first"
        return detection_f1(outputs[0], reference[0], layout, settings)[0]
    if metric == "cosine":
        return per_output_cosine(outputs, reference, names)[0]
    if metric != "relative_error":
        raise ValueError(f"unknown quality metric {metric!r}")
    got = np.concatenate([_rows(o).reshape(len(o), -1) for o in outputs], axis=1)
    ref = np.concatenate([_rows(o).reshape(len(o), -1) for o in reference], axis=1)
    if not np.all(np.isfinite(got)):
        return 0.0
    return float(max(0.0, 1.0 - np.abs(got - ref).mean() / max(np.abs(ref).mean(), 1e-12)))


def compares_text(metric: str, outputs: Sequence[Any], layout: str | None, settings: DetectionSettings,
                  parts: Sequence[str]) -> str:
    """Which parts of the outputs `metric` compares, in words (results.json, the terminal)."""
    names = [o.name for o in outputs]
    if metric == "detection":
        d = settings
        return (f"{names[0]} decoded as detections ({layout or detection_layout(outputs[0].shape)}: 4 box "
                f"coordinates + class scores; score >= {d.score_threshold}, NMS IoU {d.nms_iou}), matched to fp32's "
                f"by class at IoU >= {d.match_iou}")
    if metric in ("top1", "segmentation"):
        return f"{names[0]}: arg-max class" + (" per pixel" if metric == "segmentation" else "")
    if metric == "cosine":
        return "each output in its own scale, the worst counts: " + ("; ".join(parts) if parts else ", ".join(names))
    return ", ".join(names)
