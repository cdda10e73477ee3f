"""OAIE (Eq. 10): shapes, frozen detector, gradients to the image through V_o and V_e,
the Inception backbone and its weight loader."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from cpgan.errors import CpganError
from cpgan.model.darknet import Darknet
from cpgan.model.classifier import ToyClassifier
from cpgan.model.image_encoder import (
    ClassifierBackbone,
    InceptionBackbone,
    ObjectAwareImageEncoder,
    ToyBackbone,
    load_inception_weights,
)
from cpgan.model.losses import damsm_loss
from cpgan.model.yolo import YoloRegionExtractor

TOY_CFG = Path(__file__).resolve().parent.parent / "configs" / "darknet" / "yolov3-toy.cfg"
DIM = 16


def _encoder(use_objects: bool = True, seed: int = 0) -> ObjectAwareImageEncoder:
    torch.manual_seed(seed)
    detector = None
    if use_objects:
        detector = YoloRegionExtractor(Darknet.from_cfg_file(TOY_CFG), feature_layer=20)
    return ObjectAwareImageEncoder(ToyBackbone(image_size=64, width=8), DIM, detector,
                                   use_objects=use_objects)


def _images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, 64, 64, generator=generator) * 2 - 1).requires_grad_(True)


def _tiscl(encoder: ObjectAwareImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """DAMSM on the encoded images and fixed random text features (TISCL of Eq. 6)."""
    encoding = encoder(images)
    generator = torch.Generator().manual_seed(2)
    words = torch.randn(images.shape[0], DIM, 4, generator=generator)
    sentence = torch.randn(images.shape[0], DIM, generator=generator)
    loss, _ = damsm_loss(words, torch.tensor([4, 3]), sentence, encoding.regions,
                         encoding.global_feature, 4.0, 5.0, 10.0,
                         region_mask=encoding.region_mask)
    return loss


def test_shapes_with_and_without_objects() -> None:
    encoding = _encoder()(_images())
    assert encoding.regions.shape == (2, DIM, 100) and encoding.global_feature.shape == (2, DIM)
    assert encoding.region_mask.shape == (2, 100) and encoding.region_mask[:, 36:].all()
    assert encoding.detections is not None and encoding.detections.features.shape == (2, 36, 256)
    padded = ~encoding.region_mask[:, :36]
    assert torch.all(encoding.regions[:, :, :36].transpose(1, 2)[padded] == 0)
    plain = _encoder(use_objects=False)
    assert plain.num_regions == 64 and plain.detector is None
    encoding = plain(_images())
    assert encoding.regions.shape == (2, DIM, 64) and encoding.detections is None


def test_detector_is_frozen_and_stays_in_eval_mode() -> None:
    encoder = _encoder().train()
    assert encoder.detector is not None
    assert not encoder.detector.training and encoder.backbone.training
    assert not any(p.requires_grad for p in encoder.detector.parameters())
    _tiscl(encoder, _images()).backward()
    assert all(p.grad is None for p in encoder.detector.parameters())
    assert encoder.project_objects is not None and encoder.project_objects.weight.grad is not None
    assert encoder.backbone.local_net[0][0].weight.grad is not None  # toy backbone trains


def _zero(*layers: torch.nn.Linear | None) -> None:
    with torch.no_grad():
        for layer in layers:
            assert layer is not None
            layer.weight.zero_()


@pytest.mark.parametrize("path", ["objects", "grid", "none"])
def test_gradient_reaches_image_through_each_path(path: str) -> None:
    """Zeroing the other projections leaves one route from the pixels to the loss."""
    encoder = _encoder()
    if path == "objects":
        _zero(encoder.project_local, encoder.project_global)
    elif path == "grid":
        _zero(encoder.project_objects, encoder.project_global)
    else:
        _zero(encoder.project_local, encoder.project_global, encoder.project_objects)
    images = _images()
    _tiscl(encoder, images).backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    reached = images.grad.abs().sum().item() > 0
    assert reached == (path != "none")


def test_classifier_backbone_is_the_fitted_classifiers_trunk() -> None:
    """Started from a classifier, the backbone's global vector is the classifier's pooled
    feature and its local map the classifier's stride-8 map; it trains (not frozen), and the
    gradient of TISCL reaches the image through it."""
    torch.manual_seed(3)
    classifier = ToyClassifier(8, 8, width=4, image_size=64).eval()
    backbone = ClassifierBackbone(width=4, image_size=64)
    backbone.start_from(classifier)
    backbone.eval()
    images = _images(batch=3)
    features = backbone(images)
    assert features.local.shape == (3, 16, 8, 8) and features.pooled.shape == (3, 64)
    assert torch.allclose(features.pooled, classifier.features(images))
    assert torch.allclose(features.local, classifier.body(images))
    assert not backbone.frozen and all(p.requires_grad for p in backbone.parameters())
    encoder = ObjectAwareImageEncoder(backbone, DIM, None, use_objects=False)
    _tiscl(encoder, images[:2]).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="width 8"):
        ClassifierBackbone(width=8, image_size=64).start_from(classifier)


def test_learned_state_dict_leaves_out_the_frozen_detector() -> None:
    encoder, other = _encoder(seed=0), _encoder(seed=5)
    state = encoder.learned_state_dict()
    assert state and not any(k.startswith("detector.") for k in state)
    assert any(k.startswith("backbone.") for k in state)  # the toy backbone is learned
    other.load_learned_state_dict(state)
    assert torch.equal(other.project_objects.weight, encoder.project_objects.weight)
    assert not torch.equal(other.detector.darknet.layers[0].conv.weight,
                           encoder.detector.darknet.layers[0].conv.weight)
    with pytest.raises(ValueError, match="missing"):
        other.load_learned_state_dict({k: v for k, v in state.items() if "project_local" not in k})


def test_constructor_refuses_inconsistent_object_settings() -> None:
    with pytest.raises(ValueError, match="needs a detector"):
        ObjectAwareImageEncoder(ToyBackbone(), DIM, None, use_objects=True)


# ----------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def inception() -> InceptionBackbone:
    torch.manual_seed(0)
    return InceptionBackbone()


def test_inception_backbone_features_are_frozen_but_differentiable(
        inception: InceptionBackbone) -> None:
    encoder = ObjectAwareImageEncoder(inception, DIM, None, use_objects=False).train()
    assert not inception.net.training and not any(p.requires_grad for p in inception.parameters())
    features = inception(torch.zeros(1, 3, 64, 64))
    assert features.local.shape == (1, 768, 8, 8) and features.pooled.shape == (1, 2048)
    images = _images(batch=1)
    encoding = encoder(images)
    assert encoding.regions.shape == (1, DIM, 64)
    encoding.regions.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert "backbone.net.Mixed_6e.branch1x1.conv.weight" not in encoder.learned_state_dict()


def test_inception_loader_names_missing_file(tmp_path: Path, inception: InceptionBackbone) -> None:
    missing = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    with pytest.raises(CpganError, match="not found") as info:
        load_inception_weights(inception.net, missing)
    message = str(info.value)
    assert str(missing) in message and "--inception-weights" in message and "\n" not in message


def test_inception_loader_refuses_foreign_files(tmp_path: Path,
                                                inception: InceptionBackbone) -> None:
    pickled = tmp_path / "object.pth"
    torch.save(argparse.Namespace(a=1), pickled)  # not loadable with weights_only
    with pytest.raises(CpganError, match="object.pth"):
        load_inception_weights(inception.net, pickled)
    partial = tmp_path / "partial.pth"
    torch.save({"fc.bias": torch.zeros(1000)}, partial)
    with pytest.raises(CpganError, match="missing keys"):
        load_inception_weights(inception.net, partial)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.bias": torch.zeros(3)}, wrong)
    with pytest.raises(CpganError, match="shapes"):
        load_inception_weights(inception.net, wrong)


def test_inception_loader_loads_torchvision_state_dict(tmp_path: Path,
                                                       inception: InceptionBackbone) -> None:
    """A torchvision-style file (with the auxiliary classifier and no BN counters) loads."""
    state = {k: v.clone() for k, v in inception.net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state["fc.bias"] = torch.full((1000,), 0.25)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    load_inception_weights(inception.net, path)
    assert torch.all(inception.net.fc.bias == 0.25)
