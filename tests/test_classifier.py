"""The toy scoring network: labels, the factorised head, training, its file and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cpgan.cli.evaluate_tools import fit_classifier as fit_classifier_command
from cpgan.errors import CpganError
from cpgan.model.classifier import InceptionScorer, ToyClassifier, resize_to
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.toy import TOY_CATEGORIES, TOY_COLOURS, generate_toy_coco
from cpgan.trainer import classifier as tc

CATEGORIES = {i + 1: name for i, name in enumerate(TOY_CATEGORIES)}
WHERE = Path("instances.json")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "toy-coco"
    return generate_toy_coco(root, train_images=24, val_images=8, image_size=64, progress=False)


def _ann(ann_id: int, shape: str, colour: str, area: float, bbox: list[float] | None = None,
         segmentation: list | None = None) -> dict:
    return {"id": ann_id, "category_id": TOY_CATEGORIES.index(shape) + 1, "color": colour,
            "area": area, "bbox": bbox or [0.0, 0.0, 1.0, 1.0], "segmentation": segmentation or []}


# ------------------------------------------------------------------------------ labels


def test_class_index_is_shape_major() -> None:
    classes = tc.toy_classes()
    assert len(classes) == 64 and classes[0] == ("circle", "red")
    star_blue = TOY_CATEGORIES.index("star") * 8 + list(TOY_COLOURS).index("blue")
    assert classes[star_blue] == ("star", "blue")
    assert tc.instance_class(_ann(1, "star", "blue", 5.0), CATEGORIES, WHERE) == star_blue


def test_label_is_the_largest_visible_object() -> None:
    instances = [_ann(1, "circle", "red", 300.0), _ann(2, "heart", "green", 450.0),
                 _ann(3, "square", "white", 120.0)]
    assert tc.largest_instance(instances)["id"] == 2
    heart_green = tc.toy_classes().index(("heart", "green"))
    assert tc.image_label(instances, CATEGORIES, WHERE) == heart_green
    assert tc.image_label([], CATEGORIES, WHERE) is None


def test_ties_go_to_the_lower_annotation_id() -> None:
    instances = [_ann(7, "cross", "black", 200.0), _ann(4, "diamond", "orange", 200.0)]
    assert tc.largest_instance(instances)["id"] == 4


def test_non_toy_annotations_are_refused() -> None:
    with pytest.raises(CpganError, match="instances.json: annotation id 1 .*toy dataset"):
        tc.image_label([_ann(1, "circle", "magenta", 10.0)], CATEGORIES, WHERE)
    with pytest.raises(CpganError, match="toy dataset"):
        tc.image_label([_ann(1, "circle", "red", 10.0)], {1: "dog"}, WHERE)


@pytest.mark.parametrize("segmentation, words", [
    ([[1, 2, "x", 4, 5, 6]], "unreadable segmentation (ValueError)"),
    ([[1, 2]], "unreadable segmentation (Exception)"),
    ("a string", "unreadable segmentation (AttributeError)"),
    ({"size": [8, 8]}, "unreadable segmentation (KeyError)"),
    ({"counts": 5, "size": [8, 8]}, "unreadable segmentation (TypeError)"),
    ({"counts": "0", "size": [100000, 100000]}, "RLE segmentation of size [100000, 100000], "
                                                "its image is 8x8"),
])
def test_an_unusable_segmentation_is_one_line_naming_the_annotation(segmentation, words) -> None:
    """Segmentations go to pycocotools, whose errors are bare Exceptions, KeyErrors or (for an
    RLE larger than its image) an allocation of the RLE's own size."""
    ann = _ann(9, "circle", "red", 4.0, bbox=[0.0, 0.0, 2.0, 2.0]) | {"segmentation": segmentation}
    with pytest.raises(CpganError) as info:
        tc.class_map([ann], CATEGORIES, 8, 8, 8, WHERE)
    assert str(info.value) == f"{WHERE}: annotation id 9 has an " + words


def test_cell_targets_follow_the_visible_masks() -> None:
    """A square polygon on the left half of a 16 px image, a box-only circle in the bottom
    right quarter: 2 x 2 cells are [square, background] over [square, circle]."""
    square = _ann(1, "square", "red", 128.0, segmentation=[[0, 0, 7.5, 0, 7.5, 15.5, 0, 15.5]])
    circle = _ann(2, "circle", "blue", 64.0, bbox=[8.0, 8.0, 8.0, 8.0])
    full = tc.class_map([square, circle], CATEGORIES, 16, 16, 16, WHERE)
    sq, ci = tc.toy_classes().index(("square", "red")), tc.toy_classes().index(("circle", "blue"))
    assert full.shape == (16, 16) and (full[:, :8] == sq).all() and (full[8:, 8:] == ci).all()
    assert tc.cell_targets(torch.from_numpy(full)[None]).tolist() == [[[sq, 64], [sq, ci]]]
    half = tc.class_map([square, circle], CATEGORIES, 16, 16, 8, WHERE)  # resized with the image
    assert half[:, :4].tolist() == [[sq] * 4] * 8 and half[4:, 4:].tolist() == [[ci] * 4] * 4


def test_augmentation_moves_images_and_class_maps_together() -> None:
    maps = torch.randint(0, 65, (16, 32, 32), dtype=torch.uint8)
    images = maps.float().unsqueeze(1).expand(-1, 3, -1, -1) / 64
    moved, moved_maps = tc.augment(images, maps, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape and moved_maps.dtype == torch.uint8
    torch.testing.assert_close(moved[:, 0] * 64, moved_maps.float())
    assert not torch.equal(moved_maps, maps)  # something moved
    assert sum(torch.equal(m, maps[i].flip(-1)) or torch.equal(m, maps[i])
               for i, m in enumerate(moved_maps)) < 16  # not only flips: shifts too


def test_load_labelled_matches_the_annotations(toy_root: Path) -> None:
    split = CocoSplit.open(toy_root, "train2014", require_instances=True)
    data = tc.load_labelled(split, 32, progress=False)
    assert data.images.shape == (24, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.maps.shape == (24, 32, 32)
    cell_sets = tc.cell_targets(data.maps)
    for image_id, label in zip(data.image_ids, data.labels.tolist()):
        instances = split.instances(image_id)
        biggest = max(instances, key=lambda a: (a["area"], -a["id"]))
        assert tc.toy_classes()[label] == (TOY_CATEGORIES[biggest["category_id"] - 1],
                                           biggest["color"])
        present = {tc.instance_class(a, CATEGORIES, WHERE) for a in instances}
        cells = set(cell_sets[data.image_ids.index(image_id)].flatten().tolist())
        assert cells <= present | {64} and 64 in cells
        assert set(data.maps[data.image_ids.index(image_id)].flatten().tolist()) == present | {64}


# ------------------------------------------------------------------------------ the network


def test_logits_are_shape_plus_colour_plus_a_joint_term() -> None:
    """Without the joint term the softmax is exactly p(shape) p(colour); the joint term lets the
    network bind attributes, e.g. put all mass on (circle, red) and (square, green), which no
    product of marginals can (it would also give (circle, green) a quarter)."""
    torch.manual_seed(0)
    model = ToyClassifier(8, 8, width=4, image_size=32).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    logits, features = model.predict(images)
    assert logits.shape == (2, 64) and features.shape == (2, 64)
    torch.testing.assert_close(logits, model(images))
    with torch.no_grad():
        model.joint_head.weight.zero_()
        model.joint_head.bias.zero_()
    shape = torch.softmax(model.shape_head(features), dim=1)
    colour = torch.softmax(model.colour_head(features), dim=1)
    joint = torch.softmax(model(images), dim=1).view(2, 8, 8)
    torch.testing.assert_close(joint, shape.unsqueeze(2) * colour.unsqueeze(1))
    with torch.no_grad():
        for head in (model.shape_head, model.colour_head):
            head.weight.zero_()
            head.bias.zero_()
        model.joint_head.bias[[0 * 8 + 0, 1 * 8 + 1]] = 30.0
    with torch.no_grad():
        bound = torch.softmax(model(images), dim=1).view(2, 8, 8)
    torch.testing.assert_close(bound[:, 0, 0], torch.full((2,), 0.5))
    assert float(bound[:, 0, 1].max()) < 1e-6
    _, dense = model.segment(images)
    assert dense.shape == (2, 65, 4, 4)


def test_larger_images_are_area_resized_like_the_training_images() -> None:
    """Shrinking matches OpenCV's INTER_AREA (how real images are prepared), so a 2x nearest
    upsampled image scores exactly as the original."""
    torch.manual_seed(0)
    model = ToyClassifier(8, 8, width=4, image_size=32).eval()
    pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8)
    expected = tc.to_unit_range(tc.resize_image(pixels.numpy(), 32))
    torch.testing.assert_close(resize_to(tc.to_unit_range(pixels.permute(2, 0, 1))[None], 32)[0],
                               expected, atol=1e-2, rtol=0.0)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    big = torch.nn.functional.interpolate(image, scale_factor=2, mode="nearest")
    torch.testing.assert_close(model(big), model(image))


def test_training_steps_lower_the_loss(toy_root: Path) -> None:
    data = tc.load_labelled(CocoSplit.open(toy_root, "train2014", True), 32, progress=False)
    torch.manual_seed(0)
    model = ToyClassifier(8, 8, width=8, image_size=32)
    losses = tc.train_steps(model, data, epochs=12, batch_size=8, lr=3e-3, seed=0,
                            device="cpu", progress=False)
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------------------ files


def test_fit_classifier_writes_a_loadable_classifier(toy_root: Path, tmp_path: Path) -> None:
    summary = tc.fit_classifier(toy_root, tmp_path, image_size=32, width=4, epochs=1,
                                batch_size=8, progress=False)
    assert summary["train_images"] == 24 and summary["val_images"] == 8
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and len(summary["history"]) == 1
    model = tc.load_classifier(tmp_path / "models" / "classifier.pt", image_size=32)
    assert not model.training and model.image_size == 32 and model.width == 4
    probs, features = tc.score_images(model, torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert probs.shape == (3, 64) and features.shape == (3, 64)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))


def _saved(path: Path, image_size: int = 32) -> Path:
    tc.save_classifier(path, ToyClassifier(8, 8, width=4, image_size=image_size))
    return path


def test_load_classifier_refuses_another_image_size(tmp_path: Path) -> None:
    path = _saved(tmp_path / "classifier.pt", image_size=32)
    with pytest.raises(CpganError, match="fitted at 32 px, images are scored at 64 px"):
        tc.load_classifier(path, image_size=64)


def test_load_classifier_refuses_other_classes(tmp_path: Path) -> None:
    path = _saved(tmp_path / "classifier.pt")
    data = torch.load(path, weights_only=True)
    data["classes"] = data["classes"][::-1]
    torch.save(data, path)
    with pytest.raises(CpganError, match="not the toy dataset's"):
        tc.load_classifier(path)


def test_load_classifier_refuses_files_that_are_not_classifiers(tmp_path: Path) -> None:
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CpganError, match="expected a dict with state_dict"):
        tc.load_classifier(tensor_file)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "model": ToyClassifier(8, 8, width=4)}, pickled)
    with pytest.raises(CpganError, match="pickled.pt: not a readable classifier file"):
        tc.load_classifier(pickled)
    wrong = _saved(tmp_path / "wrong.pt")
    data = torch.load(wrong, weights_only=True)
    data["width"] = 8
    torch.save(data, wrong)
    with pytest.raises(CpganError, match="weights do not fit"):
        tc.load_classifier(wrong)
    with pytest.raises(CpganError, match="missing.pt: classifier file not found"):
        tc.load_classifier(tmp_path / "missing.pt")


def test_load_classifier_refuses_nan_weights(tmp_path: Path) -> None:
    path = _saved(tmp_path / "classifier.pt")
    data = torch.load(path, weights_only=True)
    key = next(k for k, v in data["state_dict"].items() if v.is_floating_point())
    data["state_dict"][key] = torch.full_like(data["state_dict"][key], float("inf"))
    torch.save(data, path)
    with pytest.raises(CpganError, match=f"classifier.pt: 'state_dict' entry '{key}' holds NaN"):
        tc.load_classifier(path)


def test_inception_scorer_loads_a_local_state_dict(tmp_path: Path) -> None:
    with pytest.raises(CpganError, match="inception.pth: Inception-v3 weights file not found"):
        tc.load_scoring_network("inception", tmp_path / "inception.pth")
    path = tmp_path / "inception.pth"
    torch.save(InceptionScorer().net.state_dict(), path)
    scorer = tc.load_scoring_network("inception", path)
    logits, features = scorer.predict(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 1000) and features.shape == (1, 2048)
    with pytest.raises(ValueError, match="unknown scoring network"):
        tc.load_scoring_network("fid", path)


# ------------------------------------------------------------------------------ CLI


def test_fit_classifier_command_writes_the_record(toy_root: Path, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    result = CliRunner().invoke(fit_classifier_command, [
        "--artifacts", str(artifacts), "--coco-root", str(toy_root), "--epochs", "1",
        "--batch-size", "8", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert "val accuracy" in result.output
    record = json.loads((artifacts / "models" / "classifier.json").read_text())
    assert record["params"]["image_size"] == 32 and record["params"]["epochs"] == 1
    assert record["config"]["preset"] == "toy" and record["summary"]["train_images"] == 24
    assert set(record["outputs"]) == {"classifier.pt"}
    assert tc.load_classifier(artifacts / "models" / "classifier.pt", 32).image_size == 32
    # a rerun with the same settings skips; a changed model file or setting fits again
    model = artifacts / "models" / "classifier.pt"
    before = model.stat().st_mtime_ns
    args = ["--artifacts", str(artifacts), "--coco-root", str(toy_root), "--epochs", "1",
            "--batch-size", "8", "--image-size", "32"]
    again = CliRunner().invoke(fit_classifier_command, args)
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    assert model.stat().st_mtime_ns == before
    model.write_bytes(model.read_bytes() + b"x")
    refit = CliRunner().invoke(fit_classifier_command, args)
    assert refit.exit_code == 0 and "up to date" not in refit.output, refit.output
