"""data_gen.context: COCO captions + instances -> per-image text for the GPT prompt."""

from __future__ import annotations

import json

import pytest

from data_gen.context import ContextError, format_box, format_context, load_contexts, normalize_box


def write_coco(tmp_path, images, captions, boxes, categories):
    cap = tmp_path / "captions.json"
    ins = tmp_path / "instances.json"
    cap.write_text(json.dumps({"images": images, "annotations": captions}))
    ins.write_text(json.dumps({"images": images, "annotations": boxes, "categories": categories}))
    return cap, ins


def test_boxes_are_normalised_clipped_and_three_decimals(tmp_path):
    images = [{"id": 7, "file_name": "train2017/000000000007.jpg", "width": 640, "height": 480},
              {"id": 3, "file_name": "000000000003.jpg", "width": 100, "height": 200}]
    captions = [{"image_id": 7, "caption": "  A dog   on a couch. "}, {"image_id": 7, "caption": "A brown dog."},
                {"image_id": 3, "caption": "A cat."}]
    boxes = [{"image_id": 7, "category_id": 18, "bbox": [64, 48, 320, 240]},
             {"image_id": 7, "category_id": 63, "bbox": [600, 400, 100, 100]},   # spills over: clipped to 1
             {"image_id": 7, "category_id": 18, "bbox": [1, 1, 0, 5]},          # zero width: skipped
             {"image_id": 3, "category_id": 99, "bbox": [1, 1, 5, 5]},          # unknown category: skipped
             {"image_id": 42, "category_id": 18, "bbox": [1, 1, 5, 5]}]         # unknown image: skipped
    cap, ins = write_coco(tmp_path, images, captions, boxes, [{"id": 18, "name": "dog"}, {"id": 63, "name": "couch"}])
    contexts, skipped = load_contexts(cap, ins)
    assert [c.image_id for c in contexts] == [3, 7]
    dog = contexts[1]
    assert dog.file_name == "000000000007.jpg" and dog.captions == ["A dog on a couch.", "A brown dog."]
    assert dog.objects == [("dog", (0.1, 0.1, 0.6, 0.6)), ("couch", (0.938, 0.833, 1.0, 1.0))]
    assert skipped == {"box_malformed": 1, "box_unknown_category": 1, "box_unknown_image": 1}
    text = format_context(dog, with_boxes=True)
    assert text.splitlines() == ["Descriptions:", "A dog on a couch.", "A brown dog.", "", "Objects:",
                                 "dog: [0.100, 0.100, 0.600, 0.600]", "couch: [0.938, 0.833, 1.000, 1.000]"]
    assert format_context(dog, with_boxes=False) == "Descriptions:\nA dog on a couch.\nA brown dog."
    assert format_context(contexts[0], with_boxes=True).endswith("Objects:\n(none listed)")


def test_images_without_captions_and_bad_captions_are_counted(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10},
              {"id": 2, "file_name": "b.jpg", "width": 10, "height": 10}]
    captions = [{"image_id": 1, "caption": "ok"}, {"image_id": 1, "caption": "  "}, {"image_id": 5, "caption": "x"}]
    cap, _ = write_coco(tmp_path, images, captions, [], [])
    contexts, skipped = load_contexts(cap)
    assert [c.file_name for c in contexts] == ["a.jpg"]
    assert skipped == {"caption_missing_text": 1, "caption_unknown_image": 1, "image_without_captions": 1}


def test_wrong_layout_raises_named_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ContextError, match="images"):
        load_contexts(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ContextError, match="COCO captions"):
        load_contexts(bad)


def test_normalize_box_rejects_garbage():
    assert normalize_box([0, 0, 10, 10], 20, 40) == (0.0, 0.0, 0.5, 0.25)
    assert normalize_box([0, 0, "x", 10], 20, 40) is None
    assert normalize_box([0, 0, 10], 20, 40) is None
    assert normalize_box([0, 0, float("nan"), 10], 20, 40) is None
    assert format_box((0.0, 0.5, 0.25, 1.0)) == "[0.000, 0.500, 0.250, 1.000]"
