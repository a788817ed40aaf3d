"""Training loop: config <-> YAML, exact resume after SIGINT or a crash, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from apretrieval.cli import main
from apretrieval.losses import APLoss, ContrastiveLoss, TieAwareAPLoss, TripletLoss
from apretrieval.models import load_checkpoint, load_model
from apretrieval.train_config import TrainConfig
from apretrieval.training import TrainingInterrupted, lr_factor, make_loss, train

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 classes x 4 small images (one class folder also holds a corrupt file)."""
    root = tmp_path_factory.mktemp("train_folder")
    rng = np.random.default_rng(0)
    for c in range(4):
        base = rng.random(3) * 255
        for i in range(4):
            arr = np.clip(base + rng.normal(0, 40, (24 + 2 * i, 30, 3)), 0, 255)
            (root / f"class{c}").mkdir(exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(root / f"class{c}" / f"{i}.jpg")
    (root / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def tiny_config(folder: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(folder), backbone="resnet18", pretrained=None, out_dim=16,
                batch_size=8, images_per_class=2, chunk_size=4, max_side=32, steps=4,
                lr=1e-3, schedule="cosine", warmup_steps=1, output_dir=str(out), num_workers=0,
                checkpoint_every=2, progress=False, whiten_init="pca", pca_images=6)
    base.update(kw)
    return TrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if "loss" in json.loads(ln)]


@pytest.fixture(scope="module")
def reference_run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    return train(tiny_config(folder, out))


def test_run_directory_contents(reference_run):
    run = reference_run.parent
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt", "config.yaml", "metrics.jsonl", "model.pt"
    ]
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "images_per_s", "images", "skipped", "gem_p"} <= set(records[0])
    assert all(r["images"] + r["skipped"] == 8 for r in records)
    assert TrainConfig.from_yaml(run / "config.yaml").steps == 4
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4
    # The model moved away from its initialisation.
    assert not all(np.isclose(r["gem_p"], 3.0) for r in records)


def test_resume_after_sigint_reaches_the_same_weights(folder, tmp_path, reference_run):
    cfg = tiny_config(folder, tmp_path / "run")

    def interrupt(step, model):
        os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C arrived during step 1

    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, callback=interrupt, callback_every=1)
    assert load_checkpoint(info.value.checkpoint)["step"] == 1
    final = train(cfg, resume=True)
    assert_same_weights(final, reference_run)
    assert losses(final.parent) == losses(reference_run.parent)


def test_resume_after_crash_from_periodic_checkpoint(folder, tmp_path, reference_run):
    cfg = tiny_config(folder, tmp_path / "run")

    def crash(step, model):
        if step == 3:  # checkpoint of step 2 exists; step 3 is lost
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg, callback=crash, callback_every=1)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    final = train(cfg, resume=True)
    assert_same_weights(final, reference_run)
    assert losses(final.parent) == losses(reference_run.parent)  # lost step's line dropped


def test_streamed_batches_equal_decoded_batches(folder, tmp_path, reference_run):
    """Batches too big for memory stream through loaders (threads): same training."""
    final = train(tiny_config(folder, tmp_path / "run", image_cache_mb=0, num_workers=2))
    assert_same_weights(final, reference_run)


def test_callback_metrics_are_logged(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path / "run", steps=2, whiten_init="identity")
    calls = []

    def evaluate(step, model):
        calls.append((step, model.training))
        return {"mAP": 0.5}

    train(cfg, callback=evaluate, callback_every=1)
    assert calls == [(1, False), (2, False)]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(ln) for ln in lines]
    assert records[0]["mAP"] == 0.5 and records[-1] == {"step": 2, "mAP": 0.5}


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_resume(folder, tmp_path, reference_run):
    cfg = tiny_config(folder, tmp_path / "run", steps=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-c", "import sys; from apretrieval.cli import main; "
           "sys.exit(main(sys.argv[1:]))", "train", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-exact needs the reference's threads
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert 1 <= load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] < 4
    assert main(["train", "--config", str(path), "--resume"]) == 0
    assert_same_weights(tmp_path / "run" / "model.pt", reference_run)


def test_cli_train_with_overrides(folder, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_config(folder, tmp_path / "x").to_dict()))
    out = tmp_path / "cli-run"
    code = main(["train", "-c", str(path), "--steps", "1", "--output-dir", str(out),
                 "--loss", "triplet", "--margin", "0.2", "--crop-scale", "[0.5, 1]"])
    assert code == 0 and (out / "model.pt").exists()
    saved = TrainConfig.from_yaml(out / "config.yaml")
    assert (saved.steps, saved.loss, saved.margin) == (1, "triplet", 0.2)
    assert saved.crop_scale == (0.5, 1.0)
    assert main(["train", "-c", str(path), "--num-bins", "40", "--print-config"]) == 0
    assert "num_bins: 40" in capsys.readouterr().out
    assert main(["train", "-c", str(path), "--loss", "hinge"]) == 2
    assert "loss must be one of" in capsys.readouterr().err


def test_config_yaml_round_trip_and_errors(tmp_path):
    cfg = TrainConfig(data="x", crop_scale=(0.3, 1.0), out_dim=128)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert TrainConfig.from_yaml(path) == cfg
    with pytest.raises(ValueError, match="unknown config keys \\['num_bin'\\]"):
        TrainConfig.from_dict({"data": "x", "num_bin": 10})
    with pytest.raises(ValueError, match="batch_size: expected int"):
        TrainConfig.from_dict({"data": "x", "batch_size": "many"})
    with pytest.raises(ValueError, match="multiple of images_per_class"):
        TrainConfig.from_dict({"data": "x", "batch_size": 10, "images_per_class": 4})
    with pytest.raises(ValueError, match="data is required"):
        TrainConfig.from_dict({})
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig.from_dict({"data": "x", "crop_scale": [0.9, 0.1]})


@pytest.mark.parametrize("name", ["landmarks-clean-r101-gem-ap.yaml", "cpu-small.yaml"])
def test_shipped_recipes_are_valid(name):
    cfg = TrainConfig.from_yaml(CONFIGS / name)
    assert cfg.loss == "ap" and cfg.num_bins == 20
    if name.startswith("landmarks"):
        assert (cfg.backbone, cfg.batch_size, cfg.max_side) == ("resnet101", 4096, 800)
        assert cfg.gem_p == 3.0
        assert cfg.hflip == 0.0 and cfg.chunk_size < cfg.batch_size


def test_loss_selection_and_schedules():
    cfg = TrainConfig(data="x", num_bins=25)
    assert isinstance(make_loss(cfg), APLoss) and make_loss(cfg).num_bins == 25
    assert isinstance(make_loss(cfg.replace(loss="tie_aware_ap")), TieAwareAPLoss)
    contrastive = make_loss(cfg.replace(loss="contrastive", margin=0.5, num_hard=3))
    assert isinstance(contrastive, ContrastiveLoss) and contrastive.num_hard == 3
    assert isinstance(make_loss(cfg.replace(loss="triplet")), TripletLoss)
    f = lr_factor(cfg.replace(schedule="cosine", steps=10, warmup_steps=2))
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == pytest.approx(0.0)
    g = lr_factor(cfg.replace(schedule="exponential", lr_decay=0.5))
    assert [g(0), g(3)] == [1.0, 0.125]
    assert lr_factor(cfg.replace(schedule="constant"))(99) == 1.0
