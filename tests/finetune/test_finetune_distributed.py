"""Data-parallel fine-tuning with torchrun: 2 CPU processes (gloo) give the single-process
result, since the batch size is global and the sampler splits each global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imvec
from imvec.finetune import FinetuneConfig, finetune, make_toy_dataset

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import HEAD  # noqa: E402


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, converted):
    root = tmp_path_factory.mktemp("ddp")
    data = make_toy_dataset(root / "data", per_class=8, size=40, seed=6)
    model = converted("mobilenet_v1_025_128")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(Path(__file__).parent / "ddp_worker.py"),
               str(data), str(model), str(root / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, data, model


def test_two_processes_match_one(ddp_runs):
    root, data, model = ddp_runs
    single = finetune(FinetuneConfig(str(data), str(model), str(root / "single"), **HEAD))
    ddp = json.loads((root / "ddp" / "head" / "metrics.json").read_text())["epochs"]
    for one, two in zip(single.history, ddp, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    a = load_file(single.model_path)
    b = load_file(root / "ddp" / "head" / "model.safetensors")
    for key in ("Logits.Conv2d_1c_1x1.weight", "Logits.Conv2d_1c_1x1.bias"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert not a["Logits.Conv2d_1c_1x1.bias"].eq(0).all()


def test_full_mode_under_ddp_saves_one_consistent_model(ddp_runs):
    root, data, _ = ddp_runs
    run = root / "ddp" / "full"
    module = imvec.load(run / "model.safetensors")
    assert module.class_names == ["blue", "green", "red"]
    history = json.loads((run / "metrics.json").read_text())["epochs"]
    assert len(history) == 1 and history[0]["val_accuracy"] is not None
    stats = [v for k, v in load_file(run / "model.safetensors").items() if "running" in k]
    assert stats and all(torch.isfinite(v).all() for v in stats)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["rng"]) == 2  # each process's RNG state, for an exact resume
