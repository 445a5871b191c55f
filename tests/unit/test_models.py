"""Models by name, preprocessing, and clear errors for bad shapes."""

import pytest
import torch

from bird_core.data.base import DatasetSplits, Split
from bird_core.methods import create_method
from bird_core.models import NetOutput, available_models, create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import TeacherFeatures, TrainConfig, fit


@pytest.mark.parametrize(
    ("name", "options", "shape"),
    [
        ("small_cnn", {"width": 4, "embed_dim": 8}, (2, 3, 12, 12)),
        ("resnet18", {"width": 4, "stem": "cifar"}, (2, 3, 16, 16)),
        ("resnet18", {"width": 4, "stem": "imagenet"}, (2, 3, 32, 32)),
        ("mlp", {"in_features": 7, "hidden": [5]}, (2, 7)),
        ("tv:resnet18", {"embed_dim": 16}, (2, 3, 32, 32)),
        ("timm:resnet18", {"embed_dim": 16}, (2, 3, 32, 32)),
        ("efficientnet_lite0_probe", {"image_size": 32, "weights": None}, (2, 3, 32, 32)),
    ],
)
def test_models_by_name_give_logits_and_features(name, options, shape):
    net = create_model(name, 5, **options)
    logits = net(torch.randn(*shape))
    assert logits.shape == (2, 5)
    out = net(torch.randn(*shape), features=True)
    assert isinstance(out, NetOutput)
    assert out.embedding.shape == (2, net.embed_dim)
    assert net.model_name == name


def test_full_width_resnet18_matches_torchvision_parameter_count():
    import torchvision

    ours = create_model("resnet18", 1000, width=64, stem="imagenet")
    theirs = torchvision.models.resnet18(weights=None)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_pretrained_probe_is_frozen_and_loads_real_weights():
    net = create_model("efficientnet_lite0_probe", 3, image_size=32)
    net.train()
    assert not net.backbone.training  # the frozen backbone never switches to train mode
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    stem = net.backbone._conv_stem.weight
    assert stem.abs().sum() > 0 and stem.std() > 0.05  # real ImageNet weights, not an init


def test_unknown_model_and_option_are_named():
    with pytest.raises(ValueError, match=r"unknown model .nope.*small_cnn"):
        create_model("nope", 3)
    with pytest.raises(TypeError, match=r"unknown option.*.depth.*width"):
        create_model("small_cnn", 3, depth=3)
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", 3, stem="bogus")
    assert "small_cnn" in available_models()


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        Split(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    pre = Preprocessor("image", [0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        pre(torch.zeros(2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 channels/features but preprocessing expects 3"):
        pre(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std values must be positive"):
        Preprocessor("tabular", [0.0], [0.0])
    with pytest.raises(ValueError, match="kind"):
        Preprocessor.from_config({"kind": "audio", "mean": [0], "std": [1]})


def test_fit_rejects_features_that_do_not_match_the_split():
    split = Split(
        torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.arange(8) % 2, torch.arange(8) % 2
    )
    data = DatasetSplits("t", split, split, split, 2, 2)
    student = create_model("small_cnn", 2, width=2, embed_dim=4)
    method = create_method("bkd")
    method.setup(student_dim=4, teacher_dim=3, num_classes=2, task="multiclass")
    features = TeacherFeatures(torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="5 rows but the train split has 8"):
        fit(
            student,
            method,
            data,
            TrainConfig(epochs=1),
            preprocess=Preprocessor("image", [0.5] * 3, [0.25] * 3),
            train_features=features,
        )
    with pytest.raises(ValueError, match="needs precomputed teacher features"):
        fit(
            student,
            method,
            data,
            TrainConfig(epochs=1),
            preprocess=Preprocessor("image", [0.5] * 3, [0.25] * 3),
        )
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
