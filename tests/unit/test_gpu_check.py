"""The GPU check script in its CPU smoke setting, and the bf16/channels-last options.

No GPU exists on the test machines: the GPU path itself runs only where a GPU is lent (see
docs/results.md); here the same code runs on the CPU with bf16 autocast and channels-last.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from bird_core.train import StepFormat, TrainConfig, is_channels_last

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_tiny_on_cpu_and_reports_every_configuration(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["bf16"] and result["channels_last"]
    assert set(result["images_per_s"]) == {
        "plain_amp_ce",
        "bkd",
        "bird_interval1",
        "bird_interval4",
    }
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["ratio_to_plain_amp"]["plain_amp_ce"] == 1.0
    assert "× plain AMP" in proc.stdout


def test_bf16_and_channels_last_default_on_for_gpus_only():
    assert not TrainConfig(device="cpu").use_bf16
    assert not TrainConfig(device="cpu").use_channels_last
    assert TrainConfig(device="cuda:0").use_bf16
    assert TrainConfig(device="cuda").use_channels_last
    assert TrainConfig(device="cpu", bf16=True).use_bf16
    assert not TrainConfig(device="cuda", channels_last=False).use_channels_last


def test_step_format_is_the_one_decision_of_both_training_loops():
    """bf16 and channels-last: an explicit setting wins, else on for CUDA devices only. fit and
    the Ray Train loop both ask TrainConfig.step_format for the device they run on."""
    assert StepFormat.resolve(None, None, "cpu") == StepFormat(bf16=False, channels_last=False)
    assert StepFormat.resolve(None, None, torch.device("cuda", 1)) == StepFormat(True, True)
    assert StepFormat.resolve(True, None, "cpu") == StepFormat(bf16=True, channels_last=False)
    assert StepFormat.resolve(None, False, "cuda:0") == StepFormat(bf16=True, channels_last=False)
    # The device a loop runs on decides, not the config's default device.
    assert TrainConfig().step_format("cuda:0") == StepFormat(bf16=True, channels_last=True)
    assert TrainConfig(bf16=False).step_format("cuda:0").bf16 is False


def test_step_format_converts_image_models_and_batches_only():
    from bird_core.methods.base import Batch
    from bird_core.models import create_model

    on, off = StepFormat(bf16=False, channels_last=True), StepFormat(False, False)
    model = create_model("small_cnn", 3, width=4, embed_dim=8)
    assert not is_channels_last(off.prepare_model(model))
    assert is_channels_last(on.prepare_model(model))
    assert not is_channels_last(create_model("mlp", 3, in_features=5, embed_dim=8))
    images = Batch(x=torch.randn(4, 3, 8, 8), label=torch.zeros(4), group=torch.zeros(4))
    assert on.prepare_batch(images).x.is_contiguous(memory_format=torch.channels_last)
    assert not images.x.is_contiguous()
    rows = Batch(x=torch.randn(4, 5), label=torch.zeros(4), group=torch.zeros(4))
    assert on.prepare_batch(rows).x.is_contiguous()


def test_bird_trains_under_bf16_autocast_and_channels_last(tiny_image_data):
    from bird_core.methods import create_method
    from bird_core.models import create_model
    from bird_core.preprocess import Preprocessor
    from bird_core.train import compute_teacher_features, fit

    preprocess = Preprocessor.from_config(tiny_image_data.preprocessing)
    teacher = create_model("small_cnn", 3, width=4, embed_dim=8)
    features = compute_teacher_features(teacher, preprocess, tiny_image_data.train)
    student = create_model("small_cnn", 3, width=4, embed_dim=8)
    method = create_method("bird")
    method.setup(student_dim=8, teacher_dim=8, num_classes=3, task="multiclass")
    phi_before = method.fair.phi.clone()
    config = TrainConfig(epochs=1, batch_size=16, bf16=True, channels_last=True)
    result = fit(
        student, method, tiny_image_data, config, preprocess=preprocess, train_features=features
    )
    assert result.epochs[0].train["loss"] > 0
    assert not method.fair.phi.equal(phi_before)  # the meta step ran under autocast too
    assert student.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
