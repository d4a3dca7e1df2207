"""GenEval (Ghosh et al. 2023) on transformers' Mask2Former and open_clip: the strict protocol and a dense reward.

Release facts (djghosh13/geneval `evaluation/evaluate_images.py`, see notes/rewards.md §1):
- Detector: Mask2Former Swin-S, COCO instance segmentation, 80 classes mapped **by index** to GenEval's names
  (`COCO_CLASSES`; index 64-66 are "computer mouse", "tv remote", "computer keyboard"). Input: keep-ratio resize to
  shortest edge 800 / longest 1333, ImageNet mean/std. Score = class prob × mean mask prob inside the mask; box =
  tight box of the mask [xmin, ymin, xmax+1, ymax+1].
- Filtering per class: score strictly > 0.3 (0.9 when the tag is "counting"), sorted by score, at most 16, no NMS.
- Includes are ANDed in order; `found` = the top-`count` detections of the class (fewer = fail). Colour: each found
  object is composited through its mask onto #999 grey, cropped to its box, and zero-shot classified by CLIP
  ViT-L-14 `openai` (QuickGELU) among 10 colours with 3 templates; all `count` must match. Position (checked only
  if the clause matched so far; fails if the target group failed): every found object must have the relation to
  every object of the target group, by `relative_position` with margin 0.1. Excludes are ORed: fail if the class
  has >= `count` detections.

Our re-implementation (deliberate deviations): the detector is transformers' `Mask2FormerForUniversalSegmentation`
(hub `facebook/mask2former-swin-small-coco-instance`, a different training run than mmdet's checkpoint
`743b7d99`), whose post-processing binarises masks at 384x384 before resizing and pads with 0 after normalisation
(mmdet pads with 128 before); close to, not identical with, the original's decisions.

Dense training score (`GenEvalResult.score`, in [0, 1], equal to 1 exactly when `correct`): the mean of
- per include clause, a **count term**: n/count if fewer of the class are detected than asked, 1 if the number is
  allowed (>= count, and below every exclude on that class), else max(0, 1 - excess/count) (so counting gets
  partial credit on both sides, and other tags, like GenEval, allow extra instances);
- per colour clause, the fraction of the `count` asked objects (the top-`count` detections) with the right colour;
- per position clause, the fraction of (object, target object) pairs, out of count × target count, that satisfy
  the relation (missing objects count as failed pairs);
- per exclude clause on a class no include names, 1 if satisfied else 0.
Flow-GRPO's dense score (reward-server `evaluate_reward`) differs: its count term is unclipped (count 1 with 3 found
gives -1), it counts all detections so extra instances are penalised even where GenEval accepts them, it gives 0
colour/position credit whenever the count is off, and after a failed position check it appends 0 and then 1,
so a reversed position scores 0.75 instead of our 2/3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from rewards.base import Reward
from rewards.models import load_open_clip, resolve_device, resolve_dtype

# GenEval's object_names.txt: the 80 COCO classes in contiguous COCO order, GenEval's spelling.
COCO_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
COLORS: list[str] = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
POSITIONS: list[str] = ["left of", "right of", "above", "below"]
TAGS: list[str] = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
COLOR_TEMPLATES: list[str] = ["a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object"]


@dataclass
class Detection:
    label: str  # GenEval class name
    score: float
    box: tuple[float, float, float, float]  # xyxy in pixels, image y pointing down
    color: str | None = None  # one of COLORS, needed only for objects a colour clause looks at
    mask: np.ndarray | None = field(default=None, repr=False)  # bool [H, W]; the reward uses it for colour crops


@dataclass
class GenEvalResult:
    correct: bool
    score: float
    reason: str


@dataclass(frozen=True)
class GenEvalOptions:
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_threshold: float = 0.1


def relative_position(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """The relations of A to B ("left of", "right of", "above", "below"; image y points down), GenEval's rule.

    Each axis's centre offset is shrunk by `threshold` times the summed box sizes on that axis; the shrunk offset,
    divided by the norm of the raw offset, must exceed 0.5 on an axis. Diagonals can give two relations, heavy
    overlap none.
    """
    a, b = np.asarray(box_a, dtype=np.float64)[:4], np.asarray(box_b, dtype=np.float64)[:4]
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def validate_metadata(metadata: dict) -> None:
    """Clear errors for metadata not in GenEval's format (`tag`, `include` [{class, count, color?, position?}])."""
    if not isinstance(metadata, dict) or "include" not in metadata or "tag" not in metadata:
        raise ValueError(f"GenEval metadata needs 'tag' and 'include'; got {metadata!r}")
    for kind in ("include", "exclude"):
        clauses = metadata.get(kind, [])
        if not isinstance(clauses, list):
            raise ValueError(f"GenEval metadata {kind!r} must be a list; got {clauses!r}")
        for i, req in enumerate(clauses):
            if not isinstance(req, dict) or "class" not in req or "count" not in req:
                raise ValueError(f"{kind}[{i}] needs 'class' and 'count'; got {req!r}")
            if not isinstance(req["count"], int) or req["count"] < 1:
                raise ValueError(f"{kind}[{i}] count must be a positive integer; got {req['count']!r}")
            if "color" in req and req["color"] not in COLORS:
                raise ValueError(f"{kind}[{i}] colour {req['color']!r} is not one of {COLORS}")
            if "position" in req:
                rel, target = req["position"]
                if rel not in POSITIONS or not isinstance(target, int) or not 0 <= target < i or kind != "include":
                    raise ValueError(f"{kind}[{i}] position must be [relation in {POSITIONS}, index of an "
                                     f"earlier include]; got {req['position']!r}")


def filter_detections(detections: list[Detection], tag: str,
                      options: GenEvalOptions = GenEvalOptions()) -> dict[str, list[Detection]]:
    """GenEval's per-class filter: score > threshold (counting: > counting_threshold), best first, at most
    `max_objects`, no NMS; classes without detections are absent."""
    threshold = options.counting_threshold if tag == "counting" else options.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):  # stable: ties keep the detector's order
        if det.score > threshold and len(by_class.setdefault(det.label, [])) < options.max_objects:
            by_class[det.label].append(det)
    return {label: dets for label, dets in by_class.items() if dets}


def _color_of(det: Detection, classname: str) -> str:
    if det.color is None:
        raise ValueError(f"a {classname!r} detection has no colour, but a colour clause needs it")
    return det.color


def evaluate_detections(metadata: dict, detections: list[Detection],
                        options: GenEvalOptions = GenEvalOptions()) -> GenEvalResult:
    """GenEval's strict correctness and our dense score in [0, 1] for one image (rules in the module docstring).

    `detections`: everything the detector returned (unfiltered); filtering happens here. Detections that a colour
    clause looks at (the top-`count` of the class after filtering) must carry `color`.
    """
    validate_metadata(metadata)
    objects = filter_detections(detections, metadata["tag"], options)
    includes, excludes = metadata["include"], metadata.get("exclude", [])

    # Strict: GenEval's evaluate(), clause by clause.
    correct, reasons, matched_groups = True, [], []
    for req in includes:
        classname, count = req["class"], req["count"]
        found = objects.get(classname, [])[:count]
        matched = True
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [_color_of(d, classname) for d in found]
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {classname}>={count}, found "
                                   f"{colors.count(req['color'])} {req['color']}; and "
                                   + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
            if "position" in req and matched:
                relation, target = req["position"]
                if matched_groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {classname} to be {relation}")
                else:
                    for det in found:
                        for target_det in matched_groups[target]:
                            actual = relative_position(det.box, target_det.box, options.position_threshold)
                            if relation not in actual:
                                correct = matched = False
                                reasons.append(f"expected {classname} {relation} target, found "
                                               f"{' and '.join(sorted(actual)) or 'no relation to the'} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in excludes:
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")

    # Dense: partial credit per clause, every term in [0, 1].
    terms: list[float] = []
    for req in includes:
        classname, count = req["class"], req["count"]
        n = len(objects.get(classname, []))
        allowed = min([e["count"] - 1 for e in excludes if e["class"] == classname], default=math.inf)
        if n < count:
            terms.append(n / count)
        elif n <= allowed:
            terms.append(1.0)
        else:
            terms.append(max(0.0, 1.0 - (n - allowed) / count))
        found = objects.get(classname, [])[:count]
        if "color" in req:
            terms.append(sum(_color_of(d, classname) == req["color"] for d in found) / count)
        if "position" in req:
            relation, target = req["position"]
            target_req = includes[target]
            targets = objects.get(target_req["class"], [])[:target_req["count"]]
            good = sum(relation in relative_position(d.box, t.box, options.position_threshold)
                       for d in found for t in targets)
            terms.append(good / (count * target_req["count"]))
    included = {req["class"] for req in includes}
    for req in excludes:
        if req["class"] not in included:
            terms.append(float(len(objects.get(req["class"], [])) < req["count"]))
    score = sum(terms) / len(terms) if terms else float(correct)
    return GenEvalResult(correct=correct, score=score, reason="\n".join(reasons))


def summarize(results: list[GenEvalResult], metadata: list[dict]) -> dict[str, float]:
    """GenEval's aggregation: per task the mean of `correct`; `overall` = unweighted mean of the task scores."""
    if len(results) != len(metadata) or not results:
        raise ValueError(f"need one metadata record per result; got {len(results)} and {len(metadata)}")
    by_tag: dict[str, list[bool]] = {}
    for result, meta in zip(results, metadata):
        by_tag.setdefault(meta["tag"], []).append(result.correct)
    summary = {tag: sum(v) / len(v) for tag, v in by_tag.items()}
    summary["overall"] = sum(summary.values()) / len(summary)
    return summary


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box of a binary mask as GenEval/mmdet give it: [xmin, ymin, xmax+1, ymax+1]; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


class GenEvalReward(Reward):
    """Mask2Former detections + CLIP colours, scored by the GenEval rules. `__call__` returns the dense score;
    `evaluate` returns the strict per-image results. Metadata per image: GenEval's `tag`/`include`/`exclude`."""

    name = "geneval"

    def __init__(self, detector: str = "facebook/mask2former-swin-small-coco-instance",
                 clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai",
                 shortest_edge: int = 800, longest_edge: int = 1333, threshold: float = 0.3,
                 counting_threshold: float = 0.9, max_objects: int = 16, position_threshold: float = 0.1,
                 batch_size: int = 8, device: str | None = None, dtype: str | None = None,
                 detector_dtype: str = "float32"):
        """`dtype` is the colour CLIP's (default float16 on CUDA, like GenEval's fp16 autocast; float32 on CPU);
        the detector runs in `detector_dtype`, float32 as in GenEval, because its scores meet hard thresholds."""
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype if dtype is not None or self.device.type != "cuda" else "float16",
                                   self.device)
        self.detector_dtype = resolve_dtype(detector_dtype, self.device)
        self.options = GenEvalOptions(threshold, counting_threshold, max_objects, position_threshold)
        self.processor = Mask2FormerImageProcessor.from_pretrained(
            detector, size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
        self.detector = Mask2FormerForUniversalSegmentation.from_pretrained(detector, dtype=self.detector_dtype)
        self.detector = self.detector.to(self.device).eval().requires_grad_(False)
        if self.detector.config.num_labels != len(COCO_CLASSES):
            raise ValueError(f"detector {detector!r} has {self.detector.config.num_labels} classes; GenEval needs the "
                             f"{len(COCO_CLASSES)} COCO instance classes (labels are mapped by index)")
        self.clip, self.clip_preprocess, self.tokenizer = load_open_clip(clip_model, clip_pretrained, self.device,
                                                                         self.dtype)
        self.batch_size = batch_size
        self._color_classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        """All detections per image (class, score, mask box, mask), before GenEval's filtering."""
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            inputs = self.processor(images=chunk, return_tensors="pt")
            out = self.detector(pixel_values=inputs["pixel_values"].to(self.device, self.detector_dtype),
                                pixel_mask=inputs["pixel_mask"].to(self.device))
            out.class_queries_logits = out.class_queries_logits.float()
            out.masks_queries_logits = out.masks_queries_logits.float()
            # threshold 0: GenEval keeps scores from 0.3 up; the post-processor's default 0.5 would drop them.
            post = self.processor.post_process_instance_segmentation(
                out, threshold=0.0, target_sizes=[im.size[::-1] for im in chunk], return_binary_maps=True)
            for result in post:
                masks = result["segmentation"]
                dets = []
                for i, info in enumerate(result["segments_info"]):
                    mask = masks[i].bool().cpu().numpy()
                    box = mask_box(mask)
                    if box is not None:
                        dets.append(Detection(COCO_CLASSES[int(info["label_id"])], float(info["score"]), box,
                                              mask=mask))
                results.append(dets)
        return results

    @torch.no_grad()
    def _color_classifier(self, classname: str) -> torch.Tensor:
        """[D, 10] zero-shot weights: per colour, the renormalised mean of the 3 normalised template embeddings."""
        if classname not in self._color_classifiers:
            weights = []
            for color in COLORS:
                texts = [t.format(c=color, cls=classname) for t in COLOR_TEMPLATES]
                emb = self.clip.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float().mean(0)
                weights.append(emb / emb.norm())
            self._color_classifiers[classname] = torch.stack(weights, dim=1)
        return self._color_classifiers[classname]

    @torch.no_grad()
    def color_logits(self, image: Image.Image, detections: list[Detection], classname: str) -> torch.Tensor:
        """[N, 10] GenEval colour logits: each object through its mask on #999 grey, cropped to its box, CLIP
        zero-shot with 100 * cos."""
        if not detections:
            return torch.zeros(0, len(COLORS))
        image = image.convert("RGB")
        grey = Image.new("RGB", image.size, "#999")
        crops = []
        for det in detections:
            if det.mask is None:
                raise ValueError(f"a {classname!r} detection has no mask to classify its colour")
            composite = Image.composite(image, grey, Image.fromarray(det.mask.astype(np.uint8) * 255))
            crops.append(self.clip_preprocess(composite.crop(tuple(round(v) for v in det.box))))
        features = self.clip.encode_image(torch.stack(crops).to(self.device, self.dtype), normalize=True).float()
        return 100.0 * features @ self._color_classifier(classname)

    def classify_colors(self, image: Image.Image, detections: list[Detection], classname: str) -> list[str]:
        return [COLORS[i] for i in self.color_logits(image, detections, classname).argmax(1).tolist()]

    def _prepare(self, image: Image.Image, metadata: dict, detections: list[Detection]) -> list[Detection]:
        """Colour the detections that the metadata's colour clauses will look at."""
        objects = filter_detections(detections, metadata["tag"], self.options)
        for req in metadata["include"]:
            if "color" in req:
                need = [d for d in objects.get(req["class"], [])[:req["count"]] if d.color is None]
                if need:
                    for det, color in zip(need, self.classify_colors(image, need, req["class"])):
                        det.color = color
        return detections

    def evaluate(self, images: list[Image.Image], metadata: list[dict]) -> list[GenEvalResult]:
        if len(images) != len(metadata):
            raise ValueError(f"got {len(images)} images and {len(metadata)} metadata records")
        for meta in metadata:  # fail before running the detector
            validate_metadata(meta)
            for req in meta["include"] + meta.get("exclude", []):
                if req["class"] not in COCO_CLASSES:
                    raise ValueError(f"class {req['class']!r} is not one of the 80 COCO classes the detector knows")
        results = []
        for image, meta, dets in zip(images, metadata, self.detect(images)):
            results.append(evaluate_detections(meta, self._prepare(image, meta, dets), self.options))
        return results

    def __call__(self, images, prompts, metadata):
        return [r.score for r in self.evaluate(images, metadata)]
