import pytest

from cpgan.pipeline.categories import category_words, region_hits, swappable_words
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.toy import generate_toy_coco


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> CocoSplit:
    root = generate_toy_coco(tmp_path_factory.mktemp("cat") / "coco", train_images=4,
                             val_images=1, progress=False)
    return CocoSplit.open(root, "train2014")


def test_toy_words_include_synonyms(toy: CocoSplit):
    words = category_words(toy)
    ids = {name: cid for cid, name in toy.categories().items()}
    assert words["circle"] == words["ball"] == ids["circle"]
    assert words["square"] == ids["square"] and "red" not in words and "grass" not in words


def test_coco_words_are_single_word_names_and_plurals(toy: CocoSplit):
    toy = CocoSplit.open(toy.root, "train2014")  # a private copy to rewrite the categories of
    toy._instances.dataset["categories"] = [
        {"id": 1, "name": "person"}, {"id": 10, "name": "traffic light"}, {"id": 18, "name": "dog"},
        {"id": 31, "name": "handbag"}, {"id": 50, "name": "bus"}]
    toy._instances.createIndex()
    assert toy.categories()[10] == "traffic light"
    assert category_words(toy) == {"person": 1, "persons": 1, "dog": 18, "dogs": 18,
                                   "handbag": 31, "handbags": 31, "bus": 50, "buses": 50}


def test_swappable_words_keep_synonyms_together_and_plurals_apart(toy: CocoSplit):
    slots = swappable_words(toy)
    assert slots["box"][1] == slots["square"][1] != slots["circle"][1]
    assert slots["box"][0] == slots["circle"][0] == "object"
    assert slots["boxes"] == ("objects", slots["box"][1])
    assert slots["red"] == ("colour", "red") and slots["gray"] == slots["grey"]
    assert "grass" not in slots and "two" not in slots


def test_region_hits_needs_iou_half_with_the_same_category():
    instances = [{"category_id": 3, "bbox": [10, 10, 20, 20]}, {"category_id": 4, "bbox": [50, 50, 10, 10]}]
    assert region_hits([10, 10, 30, 30], instances, 3)
    assert region_hits([12, 10, 30, 30], instances, 3)          # IoU 0.9
    assert not region_hits([20, 10, 40, 30], instances, 3)      # IoU 1/3
    assert not region_hits([50, 50, 60, 60], instances, 3)      # right box, other category
    assert not region_hits([10, 10, 30, 30], instances, 7)      # category absent
