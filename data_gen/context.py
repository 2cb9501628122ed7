"""The text a GPT model reads in place of an image: its captions and its object boxes, from COCO-style JSON.

COCO `captions_*.json`: {"images": [{"id", "file_name", "width", "height"}], "annotations": [{"image_id",
"caption"}]}. COCO `instances_*.json`: the same "images", "annotations": [{"image_id", "category_id", "bbox":
[x, y, w, h] in pixels}], "categories": [{"id", "name"}]. Boxes become `category: [x1, y1, x2, y2]` with each
coordinate divided by the image width or height, clipped to [0, 1], 3 decimals.

Images without captions, and annotations that cannot be used (unknown image or category, malformed box, image
without a size), are skipped and counted by reason; the counts come back with the contexts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from typing import Any

from llava_jax.io import read_json

log = logging.getLogger(__name__)


class ContextError(ValueError):
    """A COCO file does not have the expected layout."""


@dataclasses.dataclass
class ImageContext:
    """Captions and normalised object boxes of one image. `objects` holds (category, (x1, y1, x2, y2))."""

    image_id: int | str
    file_name: str
    width: int | None
    height: int | None
    captions: list[str]
    objects: list[tuple[str, tuple[float, float, float, float]]] = dataclasses.field(default_factory=list)


def _index_images(coco: dict, path: str | os.PathLike, sizes: dict, names: dict) -> None:
    images = coco.get("images")
    if not isinstance(images, list):
        raise ContextError(f"{path}: expected a top-level 'images' list (COCO layout)")
    for image in images:
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ContextError(f"{path}: every image needs 'id' and 'file_name', got {str(image)[:120]}")
        names[image["id"]] = os.path.basename(str(image["file_name"]))
        width, height = image.get("width"), image.get("height")
        if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
            sizes[image["id"]] = (int(width), int(height))


def _annotations(coco: dict, path: str | os.PathLike) -> list[dict[str, Any]]:
    annotations = coco.get("annotations")
    if not isinstance(annotations, list):
        raise ContextError(f"{path}: expected a top-level 'annotations' list (COCO layout)")
    return annotations


def normalize_box(bbox: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO [x, y, w, h] pixels -> (x1, y1, x2, y2) as fractions of the image, clipped, 3 decimals; None if bad."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None

    def clip(v: float) -> float:
        return round(min(1.0, max(0.0, v)), 3)

    return clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height)


def load_contexts(
    captions_path: str | os.PathLike, instances_path: str | os.PathLike | None = None
) -> tuple[list[ImageContext], Counter]:
    """Contexts of every captioned image, sorted by image id, and skip counts by reason.

    Boxes come from `instances_path` when given (images there without captions are skipped).
    """
    skipped: Counter = Counter()
    sizes: dict[Any, tuple[int, int]] = {}
    names: dict[Any, str] = {}
    captions_coco = read_json(captions_path)
    if not isinstance(captions_coco, dict):
        raise ContextError(f"{captions_path}: expected a COCO captions object, got {type(captions_coco).__name__}")
    _index_images(captions_coco, captions_path, sizes, names)
    captions: dict[Any, list[str]] = {}
    for ann in _annotations(captions_coco, captions_path):
        caption = ann.get("caption") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            skipped["caption_missing_text"] += 1
        elif image_id not in names:
            skipped["caption_unknown_image"] += 1
        else:
            captions.setdefault(image_id, []).append(" ".join(caption.split()))

    objects: dict[Any, list] = {}
    if instances_path is not None:
        instances = read_json(instances_path)
        if not isinstance(instances, dict):
            raise ContextError(f"{instances_path}: expected a COCO instances object")
        _index_images(instances, instances_path, sizes, names)
        categories = instances.get("categories")
        if not isinstance(categories, list):
            raise ContextError(f"{instances_path}: expected a top-level 'categories' list (COCO layout)")
        category_names = {c["id"]: str(c["name"]) for c in categories if isinstance(c, dict) and "id" in c}
        for ann in _annotations(instances, instances_path):
            if not isinstance(ann, dict):
                skipped["box_not_an_object"] += 1
                continue
            image_id = ann.get("image_id")
            if image_id not in names:
                skipped["box_unknown_image"] += 1
                continue
            if image_id not in sizes:
                skipped["box_image_without_size"] += 1
                continue
            name = category_names.get(ann.get("category_id"))
            if name is None:
                skipped["box_unknown_category"] += 1
                continue
            box = normalize_box(ann.get("bbox"), *sizes[image_id])
            if box is None:
                skipped["box_malformed"] += 1
                continue
            objects.setdefault(image_id, []).append((name, box))

    contexts = []
    for image_id in sorted(names, key=lambda i: (str(type(i)), i)):
        if image_id not in captions:
            skipped["image_without_captions"] += 1
            continue
        width, height = sizes.get(image_id, (None, None))
        contexts.append(ImageContext(image_id, names[image_id], width, height, captions[image_id],
                                     objects.get(image_id, [])))
    if skipped:
        log.info("context: skipped %s", dict(skipped))
    return contexts, skipped


def format_box(box: tuple[float, float, float, float]) -> str:
    """(x1, y1, x2, y2) -> "[0.123, 0.456, 0.789, 1.000]"."""
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def format_context(context: ImageContext, with_boxes: bool) -> str:
    """The query text for one image: a captions section, then (when `with_boxes`) one line per object."""
    lines = ["Descriptions:", *context.captions]
    if with_boxes:
        lines += ["", "Objects:"]
        lines += [f"{name}: {format_box(box)}" for name, box in context.objects] or ["(none listed)"]
    return "\n".join(lines)
