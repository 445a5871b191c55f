"""Teachers with weights from the object store: open_clip, bird architectures, and a teacher
trained by bird itself (``bird teachers train``), each run through the Ray Data precompute.

Ray precomputes are the slow part, so this file runs exactly two (one open_clip teacher, one
bird-trained teacher); everything else builds the teacher in-process.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner

from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from bird_datasets.codec import decode_images
from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
from cli.app import app
from service.settings import Settings
from service.spec import TeacherSpec
from service.storage import MANIFEST_NAME, LocalStore, ObjectStore, S3Store, join_key
from workers.datasets import load_splits
from workers.features import load_feature_table, precompute_features
from workers.teachers import (
    CLIP_NORM,
    TeacherLoadError,
    TeacherSource,
    teacher_source_from_spec,
)

DATASET = "datasets/fm"
SIZES = {"train_size": 100, "test_size": 20, "val_fraction": 0.005, "seed": 0}

# A tiny open_clip ViT: 2 layers of width 64 on 32 px images cut into 8 px patches.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def fm_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, dict]:
    """One small FashionMNIST-S prepared once for the module, and its preprocessing."""
    store = LocalStore(tmp_path_factory.mktemp("fm") / "store")
    prepare_fashion_mnist_s(store, DATASET, **SIZES)
    return store, load_splits(store, DATASET).preprocessing


def _copy_dataset(source: ObjectStore, target: ObjectStore) -> None:
    """Copy the prepared dataset into ``target``, manifest last (as a publish would)."""
    infos = source.list(DATASET)
    for info in sorted(infos, key=lambda i: i.key.endswith(MANIFEST_NAME)):
        target.put_bytes(info.key, source.get_bytes(info.key))


def _feature_rows(store: ObjectStore, features) -> dict[str, np.ndarray]:
    table = load_feature_table(store, features).sort_by("id")
    return {
        "images": decode_images(table.column("image")),
        "split": table.column("split").to_numpy(zero_copy_only=False),
        "embedding": np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
        "logits": np.stack(table.column("logits").to_numpy(zero_copy_only=False)),
    }


def _safetensors(model: torch.nn.Module) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})


def _torch_save(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- open_clip --------------------------------------------------------------------------------


def test_open_clip_teacher_from_s3_embeds_like_a_direct_forward(
    ray_local, s3_store: S3Store, fm_source
):
    import open_clip

    source_store, preprocessing = fm_source
    _copy_dataset(source_store, s3_store)
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP).eval()
    s3_store.put_bytes("teachers/clip/open_clip.safetensors", _safetensors(clip))

    spec = {
        "kind": "open_clip",
        "arch": "tiny-vit",
        "weights_uri": s3_store.uri("teachers/clip/open_clip.safetensors"),
        "model_config": TINY_CLIP,
    }
    teacher = teacher_source_from_spec(s3_store, spec, num_classes=10)
    assert teacher.image_size == 32  # taken from the config's vision tower
    assert teacher.needs_probe

    features = precompute_features(
        s3_store,
        DATASET,
        teacher,
        dataset_preprocessing=preprocessing,
        batch_size=64,
        probe_epochs=2,
    )
    counts = json.loads(source_store.get_bytes(join_key(DATASET, MANIFEST_NAME)))["metadata"][
        "counts"
    ]
    assert features.metadata["counts"] == counts
    assert features.metadata["dims"] == {"embedding": 32, "logits": 10}
    assert features.metadata["teacher"]["model_config"] == TINY_CLIP

    rows = _feature_rows(s3_store, features)
    assert len(rows["split"]) == sum(counts.values())
    # The same decoded images through the same tiny CLIP, preprocessed by hand.
    x = torch.from_numpy(rows["images"]).float() / 255.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    mean = torch.tensor(CLIP_NORM["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_NORM["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = clip.encode_image((x - mean) / std).numpy()
    np.testing.assert_allclose(rows["embedding"], expected, atol=1e-4, rtol=1e-4)
    assert np.isfinite(rows["logits"]).all() and rows["logits"].std() > 0


def test_open_clip_weights_are_checked_against_the_architecture(s3_store: S3Store):
    import open_clip

    torch.manual_seed(1)
    clip = open_clip.CLIP(**TINY_CLIP).eval()
    # The image tower alone (open_clip's pretrained_image_path format) is a valid teacher too.
    s3_store.put_bytes("clip/tower.safetensors", _safetensors(clip.visual))
    tower = teacher_source_from_spec(
        s3_store,
        {"kind": "open_clip", "weights_uri": "clip/tower.safetensors", "model_config": TINY_CLIP},
        num_classes=10,
    )
    net, preprocess = tower.build({})
    x = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        np.testing.assert_allclose(
            net(preprocess(x), features=True).embedding,
            clip.encode_image(preprocess(x)),
            atol=1e-5,
        )

    wider = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], width=96))
    s3_store.put_bytes("clip/wider.safetensors", _safetensors(open_clip.CLIP(**wider)))
    uri = s3_store.uri("clip/wider.safetensors")
    with pytest.raises(TeacherLoadError, match="does not fit the image tower") as info:
        teacher_source_from_spec(
            s3_store,
            {"kind": "open_clip", "weights_uri": uri, "model_config": TINY_CLIP},
            num_classes=10,
        )
    assert uri in str(info.value)
    with pytest.raises(TeacherLoadError, match="unknown open_clip architecture"):
        teacher_source_from_spec(
            s3_store,
            {"kind": "open_clip", "arch": "No-Such-ViT", "weights_uri": uri},
            num_classes=10,
        )


# -- kind "model": a bird architecture with weights from the store ----------------------------


def _model_spec(uri: str, width: int = 4) -> dict:
    return {"kind": "model", "arch": "resnet18", "options": {"width": width}, "weights_uri": uri}


@pytest.mark.parametrize("fmt", ["safetensors", "torch_save"])
def test_model_teacher_loads_a_state_dict_from_s3(s3_store: S3Store, fm_source, fmt: str):
    _, preprocessing = fm_source
    torch.manual_seed(2)
    model = create_model("resnet18", 10, width=4).eval()
    data = _safetensors(model) if fmt == "safetensors" else _torch_save(model.state_dict())
    key = f"teachers/r18/model.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    s3_store.put_bytes(key, data)

    # Both spellings of the same object: a full s3:// URI and a key relative to the store.
    for uri in (s3_store.uri(key), key):
        teacher = teacher_source_from_spec(s3_store, _model_spec(uri), num_classes=10)
        assert teacher.weights == data and teacher.weights_uri == s3_store.uri(key)
        assert not teacher.needs_probe
        net, preprocess = teacher.build(preprocessing)
        x = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
        with torch.no_grad():
            torch.testing.assert_close(net(preprocess(x)), model(preprocess(x)))
        assert preprocess.config() == Preprocessor.from_config(preprocessing).config()


def test_pickled_module_is_refused_naming_the_uri(s3_store: S3Store):
    model = create_model("resnet18", 10, width=4)
    s3_store.put_bytes("teachers/pickled.pt", _torch_save(model))  # the whole nn.Module
    uri = s3_store.uri("teachers/pickled.pt")
    with pytest.raises(TeacherLoadError, match="pickled") as info:
        teacher_source_from_spec(s3_store, _model_spec(uri), num_classes=10)
    assert uri in str(info.value)
    # The Ray actor's path (TeacherSource.build) refuses it just the same.
    source = TeacherSource("model", 10, "resnet18", s3_store.get_bytes("teachers/pickled.pt"), uri)
    with pytest.raises(TeacherLoadError, match="pickled"):
        source.build({})


def test_weights_that_do_not_fit_or_do_not_exist_name_the_uri(s3_store: S3Store):
    s3_store.put_bytes(
        "teachers/w8.safetensors", _safetensors(create_model("resnet18", 10, width=8))
    )
    uri = s3_store.uri("teachers/w8.safetensors")
    with pytest.raises(TeacherLoadError, match="does not fit resnet18") as info:
        teacher_source_from_spec(s3_store, _model_spec(uri, width=4), num_classes=10)
    assert uri in str(info.value)
    unchecked = teacher_source_from_spec(s3_store, _model_spec(uri), num_classes=10, validate=False)
    with pytest.raises(TeacherLoadError, match="does not fit resnet18"):
        unchecked.build({})

    missing = s3_store.uri("teachers/none/model.safetensors")
    with pytest.raises(TeacherLoadError, match="do not exist") as info:
        teacher_source_from_spec(s3_store, _model_spec(missing), num_classes=10)
    assert missing in str(info.value)

    elsewhere = "s3://another-bucket/teachers/w8.safetensors"
    with pytest.raises(TeacherLoadError, match="outside the object store") as info:
        teacher_source_from_spec(s3_store, _model_spec(elsewhere), num_classes=10)
    assert elsewhere in str(info.value)


# -- bird teachers train ----------------------------------------------------------------------


def _s3_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Point the CLI's BIRD_* settings at the moto server."""
    monkeypatch.setenv("BIRD_S3_ENDPOINT_URL", settings.s3_endpoint_url or "")
    monkeypatch.setenv("BIRD_S3_REGION", settings.s3_region)
    monkeypatch.setenv("BIRD_S3_ACCESS_KEY_ID", settings.s3_access_key_id.get_secret_value())
    monkeypatch.setenv(
        "BIRD_S3_SECRET_ACCESS_KEY", settings.s3_secret_access_key.get_secret_value()
    )


def test_teacher_trained_by_bird_is_used_end_to_end(
    ray_local,
    s3_store: S3Store,
    s3_settings: Settings,
    fm_source,
    monkeypatch: pytest.MonkeyPatch,
):
    source_store, preprocessing = fm_source
    _copy_dataset(source_store, s3_store)
    _s3_env(monkeypatch, s3_settings)
    out_key = "teachers/fm-r18"
    out = s3_store.uri(out_key)
    args = ["teachers", "train", "--dataset", s3_store.uri(DATASET), "--out", out]
    result = CliRunner().invoke(app, [*args, "--width", "4", "--epochs", "1", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output and "published teacher resnet18" in result.output

    recorded = json.loads(s3_store.get_bytes(f"{out_key}/teacher.json"))
    assert recorded["kind"] == "model" and recorded["arch"] == "resnet18"
    assert recorded["options"] == {"width": 4} and recorded["num_classes"] == 10
    assert recorded["preprocessing"] == preprocessing
    assert 0 <= recorded["test_metrics"]["accuracy"] <= 100

    # A job's own spec: kind, arch and the weights; options and preprocessing come from
    # teacher.json, and both files are checked against the teacher's manifest.
    spec = TeacherSpec(kind="model", arch="resnet18", weights_uri=f"{out}/model.safetensors")
    teacher = teacher_source_from_spec(s3_store, spec, num_classes=10)
    assert dict(teacher.options) == {"width": 4}
    with pytest.raises(TeacherLoadError, match="predicts 10 classes"):
        teacher_source_from_spec(s3_store, spec, num_classes=2)

    features = precompute_features(
        s3_store, DATASET, teacher, dataset_preprocessing=preprocessing, batch_size=64
    )
    assert features.metadata["dims"] == {"embedding": 32, "logits": 10}
    rows = _feature_rows(s3_store, features)
    trained = create_model("resnet18", 10, width=4).eval()
    trained.load_state_dict(load_safetensors(s3_store.get_bytes(f"{out_key}/model.safetensors")))
    preprocess = Preprocessor.from_config(recorded["preprocessing"])
    with torch.no_grad():
        out_direct = trained(preprocess(torch.from_numpy(rows["images"])), features=True)
    np.testing.assert_allclose(rows["logits"], out_direct.logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(rows["embedding"], out_direct.embedding.numpy(), atol=1e-4)


def test_teachers_train_reports_bad_input_in_one_line(
    tmp_path: Path,
    fm_source,
    s3_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
):
    source_store, _ = fm_source
    dataset = str(source_store.root / DATASET)
    out = str(tmp_path / "teacher")
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, ["teachers", "train", *args])
        # An uncaught exception would be kept here instead of a SystemExit (exit code).
        assert isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
        return result

    bad_arch = run("--dataset", dataset, "--out", out, "--arch", "resnet9000")
    assert bad_arch.exit_code == 2 and "--arch 'resnet9000'" in bad_arch.stderr
    empty = tmp_path / "empty"
    no_data = run("--dataset", str(empty), "--out", out, "--epochs", "1")
    assert no_data.exit_code == 2 and empty.as_uri() in no_data.stderr
    bad_option = run("--dataset", dataset, "--out", out, "--arch", "mlp", "--width", "4")
    assert bad_option.exit_code == 2 and "width" in bad_option.stderr
    assert len(bad_option.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "teacher" / "manifest.json").exists()  # nothing published

    # A teacher in a directory is uploaded before a server's job can name it (a file:// weights
    # URI is refused there): the command says how, not with the directory's file:// URI.
    args = ("--arch", "small_cnn", "--width", "4", "--epochs", "1", "--max-steps-per-epoch", "2")
    done = runner.invoke(app, ["teachers", "train", "--dataset", dataset, "--out", out, *args])
    assert done.exit_code == 0, done.output
    assert f"upload it with: bird teachers push {out} --name teacher" in done.stdout
    assert '"weights_uri": "teachers/teacher"' in done.stdout, done.stdout
    assert '"weights_uri": "file://' not in done.stdout, done.stdout

    _s3_env(monkeypatch, s3_settings)
    no_bucket = run("--dataset", dataset, "--out", "s3://no-such-bucket/t", "--epochs", "1")
    assert no_bucket.exit_code == 1 and "no-such-bucket" in no_bucket.stderr


def _write_table(path: Path, *, signal: bool) -> None:
    """A 400-row CSV: a numeric feature, the group, and a yes/no label that is "yes" for one row
    in ten. With ``signal`` the label follows the feature; without it the feature is noise."""
    generator = np.random.default_rng(0)
    lines = ["x,sex,outcome"]
    for row in range(400):
        positive = row % 10 == 0
        x = (3.0 if positive else -3.0) if signal else 0.0
        x += float(generator.normal())
        lines.append(f"{x:.4f},{'F' if (row // 10) % 2 else 'M'},{'yes' if positive else 'no'}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("signal", [False, True], ids=["noise", "signal"])
def test_teachers_train_warns_when_the_teacher_predicts_one_class(
    tmp_path: Path, signal: bool
) -> None:
    """A teacher that predicts the majority class for every test row reports the majority's
    share as its accuracy and a Δ-DEO of 0: the command says so and how to do better."""
    _write_table(tmp_path / "table.csv", signal=signal)
    runner = CliRunner()
    data = str(tmp_path / "data")
    imported = runner.invoke(
        app,
        [
            *("datasets", "import", "table", str(tmp_path / "table.csv"), "--out", data),
            *("--label", "outcome", "--group", "sex"),
        ],
    )
    assert imported.exit_code == 0, imported.output
    out = str(tmp_path / "teacher")
    epochs = "30" if signal else "3"
    trained = runner.invoke(
        app,
        [
            *("teachers", "train", "--dataset", data, "--out", out),
            *("--arch", "mlp", "--epochs", epochs),
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert "published teacher mlp" in trained.stdout
    recorded = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    predicted = recorded["test_metrics"]["predicted_classes"]
    if signal:
        assert predicted == 2, recorded["test_metrics"]
        assert "predicts" not in trained.stderr, trained.stderr
    else:
        assert predicted == 1, recorded["test_metrics"]
        warning = trained.stderr.strip()
        assert warning.startswith("warning: the teacher predicts 1 of 2 classes"), warning
        assert "after 3 epoch(s)" in warning and "--epochs 30" in warning, warning
