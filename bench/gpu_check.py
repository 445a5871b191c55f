"""GPU check: images/s of BIRD and BKD training steps against a plain AMP loop, side by side.

Student: ResNet-18 (ImageNet stem) on 224×224 inputs; teacher outputs are precomputed (random
here: the check measures the student's step, the teacher never runs during training). The
plain loop is the reference: the same student, bf16 autocast, channels-last, CE, Adam. Runs
without Ray, plainly or under ``torchrun`` (DDP, NCCL on GPUs, gloo on CPU).

    python bench/gpu_check.py                         # a GPU, full setting
    torchrun --nproc-per-node 2 bench/gpu_check.py    # DDP
    python bench/gpu_check.py --tiny                  # CPU smoke setting (tests run this)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bird_core.methods import create_method
from bird_core.methods.base import Batch, StepContext
from bird_core.models import create_model
from bird_core.train import Distiller, TrainConfig, build_optimizer, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(n: int, size: int, classes: int, teacher_dim: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(n)
    batch = Batch(
        x=torch.randn(n, 3, size, size, generator=g),
        label=torch.randint(0, classes, (n,), generator=g),
        group=torch.randint(0, 2, (n,), generator=g),
        teacher_embedding=torch.randn(n, teacher_dim, generator=g),
        teacher_logits=torch.randn(n, classes, generator=g),
    ).to(device)
    batch.x = batch.x.contiguous(memory_format=torch.channels_last)
    return batch


def plain_step(
    student: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, bf16: bool
) -> None:
    """The reference: the textbook AMP step of the bare student (logits → CE → step)."""
    with torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(student(batch.x), batch.label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    """Measure, print ratios, write JSON (rank 0)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke setting")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    args = parser.parse_args()
    if args.tiny:
        args.batch_size, args.image_size, args.width, args.steps, args.rounds = 4, 32, 4, 2, 2

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # bf16 autocast and channels-last: the defaults on GPUs; on the CPU smoke run too, so the
    # same code path is exercised.
    bf16 = True
    classes, teacher_dim = 10, 512
    batches = [
        _batch(args.batch_size, args.image_size, classes, teacher_dim, device) for _ in range(2)
    ]
    # The reference is a plain PyTorch AMP loop (no bird_core step): see plain_step below.
    configs = {
        "plain_amp_ce": ("none", {}),
        "bkd": ("bkd", {}),
        "bird_interval1": ("bird", {"meta_interval": 1}),
        "bird_interval4": ("bird", {"meta_interval": 4}),
    }
    runners = {}
    for label, (name, options) in configs.items():
        torch.manual_seed(0)
        student = create_model(
            "resnet18", classes, width=args.width, stem="imagenet", embed_dim=256
        ).to(device, memory_format=torch.channels_last)
        method = create_method(name, **options)
        method.setup(
            student_dim=256, teacher_dim=teacher_dim, num_classes=classes, task="multiclass"
        )
        method.to(device)
        # What BIRD fits from the held-out rows before training (the teacher's head).
        method.fit_to_teacher(batches[0].teacher_embedding, batches[0].teacher_logits)
        # The plain reference trains the bare student; the others go through bird_core's step.
        module: torch.nn.Module = (
            student.train() if label == "plain_amp_ce" else Distiller(student, method).train()
        )
        if distributed:
            module = DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None
            )
        runners[label] = (
            module,
            build_optimizer(student, method, TrainConfig()),
            method.needs_meta_batch,
        )

    seconds: dict[str, list[float]] = {label: [] for label in runners}
    step = 0
    for _ in range(args.rounds + 1):  # round 0 warms up (cuDNN autotuning, allocator)
        for label, (module, optimizer, needs_meta) in runners.items():
            _sync(device)
            started = time.perf_counter()
            for i in range(args.steps):
                batch = batches[i % 2]
                if label == "plain_amp_ce":
                    plain_step(module, optimizer, batch, bf16)
                    continue
                meta = batches[(i + 1) % 2] if needs_meta else None
                train_step(module, optimizer, batch, StepContext(step=step + i), meta, bf16=bf16)
            _sync(device)
            seconds[label].append(time.perf_counter() - started)
        step += args.steps
    world = dist.get_world_size() if distributed else 1
    images = args.steps * args.batch_size * world
    rate = {label: images / statistics.median(t[1:]) for label, t in seconds.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "batch_size_per_rank": args.batch_size,
        "image_size": args.image_size,
        "student": f"resnet18(width={args.width}, stem=imagenet)",
        "bf16": bf16,
        "channels_last": True,
        "images_per_s": rate,
        "ratio_to_plain_amp": {k: v / rate["plain_amp_ce"] for k, v in rate.items()},
    }
    if not distributed or dist.get_rank() == 0:
        for label, value in rate.items():
            print(
                f"{label:16s} {value:10.1f} images/s  "
                f"{result['ratio_to_plain_amp'][label]:.2f} × plain AMP"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"device: {result['device']}; wrote {args.out}")
    if distributed:
        # Every rank past its last write before the process group goes (a rank tearing gloo
        # down while another still runs can abort at exit).
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
