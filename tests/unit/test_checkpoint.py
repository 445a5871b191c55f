"""Checkpoints: exact round trips, resumable optimizer state, corruption detection, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bird_core.checkpoint import (
    MANIFEST,
    CheckpointError,
    load_student,
    load_training_state,
    read_manifest,
    save_checkpoint,
)
from bird_core.data.base import DatasetSplits
from bird_core.methods import StepContext, create_method
from bird_core.models import Net, create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import (
    Distiller,
    TeacherFeatures,
    TrainConfig,
    build_optimizer,
    make_batch,
    train_step,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _exercise_batch_norm(model: Net, x: torch.Tensor) -> None:
    """A few train-mode passes so running statistics differ from their initial values."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()


def _cnn(data: DatasetSplits) -> tuple[Net, Preprocessor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("small_cnn", 3, width=4, embed_dim=8)
    preprocess = Preprocessor.from_config(data.preprocessing)
    _exercise_batch_norm(model, preprocess(data.train.x[:32]))
    return model, preprocess, data.val.x[:16]


def _mlp(data: DatasetSplits) -> tuple[Net, Preprocessor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("mlp", 3, in_features=5, hidden=(16, 8), embed_dim=4)
    preprocess = Preprocessor.from_config(data.preprocessing)
    return model.eval(), preprocess, data.val.x[:16]


@pytest.mark.parametrize("kind", ["small_cnn", "mlp"])
def test_load_student_reproduces_logits_exactly(kind, tmp_path, tiny_image_data, tiny_tabular_data):
    model, preprocess, raw = (
        _cnn(tiny_image_data) if kind == "small_cnn" else _mlp(tiny_tabular_data)
    )
    if kind == "small_cnn":
        assert not torch.equal(model.features[0][1].running_mean, torch.zeros(4))
    path = save_checkpoint(
        tmp_path / "ckpt",
        model,
        preprocess,
        spec={"task": "multiclass"},
        epoch=2,
        step=17,
        metrics={"accuracy": 55.5},
    )
    loaded = load_student(path)

    assert loaded.model.training is False
    assert all(not m.training for m in loaded.model.modules())
    assert type(loaded.model) is type(model)
    assert loaded.model.model_name == kind
    with torch.no_grad():
        expected = model(preprocess(raw))
        got = loaded.model(loaded.preprocess(raw))
    assert torch.equal(got, expected)
    for (name, a), (name_b, b) in zip(
        model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert name == name_b
        assert torch.equal(a, b), name

    # preprocessing round-trips: same config, same output on raw rows
    assert loaded.preprocess.config() == preprocess.config()
    assert torch.equal(loaded.preprocess(raw), preprocess(raw))

    assert loaded.meta["epoch"] == 2
    assert loaded.meta["step"] == 17
    assert loaded.meta["metrics"] == {"accuracy": 55.5}
    assert loaded.meta["model"]["name"] == kind
    probs = loaded.predict_proba(raw)
    assert torch.allclose(probs, torch.softmax(expected, dim=1))
    # Rows also come as NumPy arrays: new table rows are what `TableEncoding.encode` returns.
    assert torch.equal(loaded.predict_proba(raw.numpy()), probs)


def _trained_bird(
    data: DatasetSplits, steps: int
) -> tuple[Net, torch.nn.Module, torch.optim.Optimizer, Preprocessor, TeacherFeatures]:
    torch.manual_seed(0)
    student = create_model("small_cnn", 3, width=4, embed_dim=8)
    preprocess = Preprocessor.from_config(data.preprocessing)
    n = len(data.train)
    features = TeacherFeatures(embedding=torch.randn(n, 6), logits=torch.randn(n, 3))
    method = create_method("bird")
    method.setup(student_dim=8, teacher_dim=6, num_classes=3, task="multiclass")
    method.fit_to_teacher(features.embedding[80:], features.logits[80:])
    distiller = Distiller(student, method).train()
    optimizer = build_optimizer(student, method, TrainConfig(lr=1e-2))
    for step in range(steps):
        batch = make_batch(data.train, torch.arange(16) + 16 * step, preprocess, features, "cpu")
        meta = make_batch(data.train, torch.arange(80, 96), preprocess, features, "cpu")
        train_step(distiller, optimizer, batch, StepContext(step=step), meta)
    return student, method, optimizer, preprocess, features


def _assert_same_state(a, b, where: str = "state") -> None:
    """Recursive equality: tensors exactly (dtype included), tuples compare equal to lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert list(a) == list(b), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def test_training_state_round_trips_and_resumes_identically(tmp_path, tiny_image_data):
    data = tiny_image_data
    student, method, optimizer, preprocess, features = _trained_bird(data, steps=2)
    original_state = optimizer.state_dict()
    assert original_state["state"], "the optimizer has state to save"
    path = save_checkpoint(
        tmp_path / "ckpt", student, preprocess, method=method, optimizer=optimizer, epoch=1
    )
    state = load_training_state(path)

    _assert_same_state(original_state, state["optimizer"], "optimizer")
    assert set(state["student"]) == set(student.state_dict())
    for key, value in student.state_dict().items():
        assert torch.equal(state["student"][key], value), key
    # BIRD's φ and projector are stored with the method
    assert torch.equal(state["method"]["fair.phi"], method.fair.phi)
    assert set(state["method"]) == set(method.state_dict())
    assert state["meta"]["method"] == "bird"
    assert state["meta"]["epoch"] == 1
    gate = torch.sigmoid(method.fair.phi)
    assert state["meta"]["method_summary"]["gate_mean"] == pytest.approx(float(gate.mean()))

    # Rebuild everything from the checkpoint and take one more step on both copies.
    torch.manual_seed(99)  # a different init, overwritten by the loaded state
    resumed_student = create_model("small_cnn", 3, width=4, embed_dim=8)
    resumed_student.load_state_dict(state["student"])
    resumed_method = create_method("bird")
    resumed_method.setup(student_dim=8, teacher_dim=6, num_classes=3, task="multiclass")
    resumed_method.load_state_dict(state["method"])
    resumed_optimizer = build_optimizer(resumed_student, resumed_method, TrainConfig(lr=1e-2))
    resumed_optimizer.load_state_dict(state["optimizer"])

    batch = make_batch(data.train, torch.arange(32, 48), preprocess, features, "cpu")
    meta = make_batch(data.train, torch.arange(80, 96), preprocess, features, "cpu")
    ctx = StepContext(step=2)
    logs_a = train_step(Distiller(student, method).train(), optimizer, batch, ctx, meta)
    logs_b = train_step(
        Distiller(resumed_student, resumed_method).train(), resumed_optimizer, batch, ctx, meta
    )
    assert logs_a == logs_b
    for (name, a), b in zip(
        student.state_dict().items(), resumed_student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert torch.equal(method.fair.phi, resumed_method.fair.phi)
    _assert_same_state(optimizer.state_dict(), resumed_optimizer.state_dict(), "after step")


def test_checkpoint_without_method_or_optimizer(tmp_path, tiny_image_data):
    model, preprocess, _ = _cnn(tiny_image_data)
    path = save_checkpoint(tmp_path / "ckpt", model, preprocess, method=create_method("none"))
    state = load_training_state(path)
    assert state["method"] is None and state["optimizer"] is None
    assert sorted(read_manifest(path)["files"]) == ["meta.json", "student.safetensors"]
    assert state["meta"]["method"] == "none"


def test_checkpoint_directory_holds_no_pickle(tmp_path, tiny_image_data):
    student, method, optimizer, preprocess, _ = _trained_bird(tiny_image_data, steps=1)
    path = save_checkpoint(
        tmp_path / "ckpt", student, preprocess, method=method, optimizer=optimizer
    )
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    assert [p.name for p in files] == [
        "manifest.json",
        "meta.json",
        "method.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "student.safetensors",
    ]
    for file in files:
        head = file.read_bytes()[:4]
        assert not head.startswith(b"\x80"), f"{file.name} looks like a pickle"
        assert not head.startswith(b"PK"), f"{file.name} looks like a torch.save zip"
        assert file.suffix in (".json", ".safetensors")
        if file.suffix == ".json":
            json.loads(file.read_text())
    # the manifest vouches for every other file
    listed = set(read_manifest(path)["files"])
    assert listed == {p.name for p in files} - {MANIFEST}


@pytest.fixture
def saved(tmp_path, tiny_image_data) -> Path:
    model, preprocess, _ = _cnn(tiny_image_data)
    return save_checkpoint(tmp_path / "ckpt", model, preprocess)


def test_truncated_file_is_rejected_naming_it(saved):
    target = saved / "student.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"student\.safetensors has \d+ bytes"):
        load_student(saved)
    with pytest.raises(CheckpointError, match=r"student\.safetensors"):
        load_training_state(saved)


def test_altered_file_of_same_size_is_rejected_naming_it(saved):
    target = saved / "student.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # flip one bit in the last tensor's bytes
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"student\.safetensors does not match its sha256"):
        load_student(saved)


def test_altered_meta_is_rejected(saved):
    meta = saved / "meta.json"
    meta.write_text(meta.read_text().replace('"epoch": null', '"epoch": 9 '))
    with pytest.raises(CheckpointError, match=r"meta\.json"):
        load_student(saved)


def test_missing_manifest_is_not_a_checkpoint(saved):
    (saved / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        load_student(saved)
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_training_state(saved)


def test_missing_listed_file_is_rejected(saved):
    (saved / "student.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"student\.safetensors is listed in the manifest"):
        load_student(saved)


def test_invalid_manifest_is_rejected(saved):
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid manifest"):
        load_student(saved)


def test_resave_into_same_directory_replaces_checkpoint(tmp_path, tiny_image_data):
    model, preprocess, raw = _cnn(tiny_image_data)
    path = save_checkpoint(tmp_path / "ckpt", model, preprocess, epoch=1)
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
    save_checkpoint(path, model, preprocess, epoch=2)
    loaded = load_student(path)
    assert loaded.meta["epoch"] == 2
    with torch.no_grad():
        assert torch.equal(loaded.model(loaded.preprocess(raw)), model(preprocess(raw)))


def test_student_not_built_by_create_model_is_refused(tmp_path, tiny_image_data):
    from bird_core.models import SmallCNN

    preprocess = Preprocessor.from_config(tiny_image_data.preprocessing)
    with pytest.raises(ValueError, match="not built by create_model"):
        save_checkpoint(tmp_path / "ckpt", SmallCNN(3, width=4, embed_dim=8), preprocess)
    assert not (tmp_path / "ckpt" / MANIFEST).exists()
