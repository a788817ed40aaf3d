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

from apretrieval import training
from apretrieval.binning import DEFAULT_NUM_BINS
from apretrieval.cli import main
from apretrieval.losses.ap import APLoss, TieAwareAPLoss
from apretrieval.losses.baselines import ContrastiveLoss, TripletLoss
from apretrieval.models import load_checkpoint, load_model
from apretrieval.run_folder import RunFolderInUse, TrainingDiverged, TrainingInterrupted
from apretrieval.train_config import TrainConfig
from apretrieval.train_setup import lr_factor, make_loss
from apretrieval.training import train

CONFIGS = Path(__file__).parents[1] / "src" / "apretrieval" / "configs"


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
    base = dict(
        data=str(folder),
        backbone="resnet18",
        pretrained=None,
        out_dim=16,
        batch_size=8,
        images_per_class=2,
        chunk_size=4,
        max_side=32,
        steps=4,
        lr=1e-3,
        schedule="cosine",
        warmup_steps=1,
        output_dir=str(out),
        num_workers=0,
        checkpoint_every=2,
        progress=False,
        # Not PCA: from 6 images into 16 dimensions it leaves 11 directions to rounding, which
        # differ with the BLAS thread count (a child process, another machine); these runs are
        # compared bit for bit. init_whitening has its own tests (test_models).
        whiten_init="identity",
    )
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
        "checkpoint.pt",
        "config.yaml",
        "metrics.jsonl",
        "model.pt",
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
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # the disk filled up during the next append
    final = train(cfg, resume=True)
    assert_same_weights(final, reference_run)
    assert losses(final.parent) == losses(reference_run.parent)  # lost step's line dropped


def test_a_torn_last_log_line_is_dropped_and_a_damaged_one_named(tmp_path):
    from apretrieval.jsonl import read_jsonl
    from apretrieval.report.training_log import read_training_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(log)] == [1, 2]
    assert [r["loss"] for r in read_training_log(log)] == [0.5, 0.4]
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.4}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not JSON"):
        read_jsonl(log)
    log.write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: expected a JSON object"):
        read_jsonl(log)


def test_streamed_batches_equal_decoded_batches(folder, tmp_path, reference_run):
    """Batches too big for memory stream through loaders (threads): same training."""
    final = train(tiny_config(folder, tmp_path / "run", image_cache_mb=0, num_workers=2))
    assert_same_weights(final, reference_run)


def test_callback_metrics_are_logged(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path / "run", steps=2)
    calls = []

    def evaluate(step, model):
        calls.append((step, model.training))
        return {"mAP": 0.5}

    train(cfg, callback=evaluate, callback_every=1)
    assert calls == [(1, False), (2, False)]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(ln) for ln in lines]
    assert records[0]["mAP"] == 0.5 and records[-1] == {"step": 2, "mAP": 0.5}


# The CLI in a child process whose first training step ends by sending SIGTERM to its own
# process: a real signal, at a known step, with no race against the steps.
_SIGTERM_AFTER_FIRST_STEP = """
import os, signal, sys
import apretrieval.training as t
from apretrieval.cli import main
original = t.train_step
def step_then_sigterm(*args, **kwargs):
    out = original(*args, **kwargs)
    if not step_then_sigterm.sent:
        step_then_sigterm.sent = True
        os.kill(os.getpid(), signal.SIGTERM)
    return out
step_then_sigterm.sent = False
t.train_step = step_then_sigterm
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_to_a_training_process_then_resume(folder, tmp_path, reference_run):
    cfg = tiny_config(folder, tmp_path / "run", steps=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-c", _SIGTERM_AFTER_FIRST_STEP, "train", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-exact needs the reference's threads
    start = time.monotonic()
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert time.monotonic() - start < 300
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1  # that step's end
    assert losses(tmp_path / "run") == losses(reference_run.parent)[:1]
    assert not (tmp_path / "run" / "model.pt").exists()
    assert main(["train", "--config", str(path), "--resume"]) == 0
    assert_same_weights(tmp_path / "run" / "model.pt", reference_run)


def test_a_second_sigint_stops_at_once(folder, tmp_path):
    cfg = tiny_config(folder, tmp_path / "run")
    steps_done = []

    def two_ctrl_c(step, model):
        steps_done.append(step)
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a checkpoint after the step
        os.kill(os.getpid(), signal.SIGINT)  # the second stops now, inside this callback
        raise AssertionError("not reached: the second SIGINT interrupts")

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info:
        train(cfg, callback=two_ctrl_c, callback_every=1)
    assert not isinstance(info.value, TrainingInterrupted)  # no orderly stop
    assert steps_done == [1]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing written after step 1
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back


def test_logged_lr_is_the_lr_of_that_step(folder, tmp_path):
    cfg = tiny_config(
        folder,
        tmp_path / "run",
        steps=5,
        warmup_steps=2,
        lr=1e-2,
        checkpoint_every=10,
    )
    seen = []  # the lr each optimizer step actually uses
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"])
    )
    try:
        train(cfg)
    finally:
        hook.remove()
    records = [
        json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    f = lr_factor(cfg)
    assert [r["lr"] for r in records] == pytest.approx([1e-2 * f(t) for t in range(5)])
    assert [r["lr"] for r in records] == pytest.approx(seen)  # what the optimizer used
    assert records[0]["lr"] == pytest.approx(5e-3)  # warm-up: half the lr at step 1


def test_resume_without_checkpoint_starts_afresh_and_after_the_end_changes_nothing(
    folder, tmp_path, reference_run
):
    cfg = tiny_config(folder, tmp_path / "run")
    final = train(cfg, resume=True)  # nothing to resume: a full run from step 0
    assert_same_weights(final, reference_run)
    assert losses(final.parent) == losses(reference_run.parent)
    log_before = (final.parent / "metrics.jsonl").read_text()
    calls = []  # the run is finished: no step runs, only the end-of-run callback
    again = train(cfg, resume=True, callback=lambda step, m: calls.append(step), callback_every=1)
    assert calls == [4]
    assert_same_weights(again, reference_run)
    assert (final.parent / "metrics.jsonl").read_text() == log_before
    assert load_checkpoint(final.parent / "checkpoint.pt")["step"] == 4


def test_dataloader_worker_processes_give_the_same_training(folder, tmp_path, reference_run):
    final = train(tiny_config(folder, tmp_path / "run", num_workers=2))
    assert_same_weights(final, reference_run)


def test_a_dying_data_worker_stops_training_and_the_run_resumes(
    folder, tmp_path, reference_run, monkeypatch
):
    from apretrieval import batches
    from apretrieval.data.transforms import batch_seeds

    cfg = tiny_config(folder, tmp_path / "run", num_workers=2)
    doomed = set(batch_seeds(cfg.seed, 2, cfg.batch_size))  # the batch of step 3
    original = batches.AugmentedImages.__getitem__

    def die_in_step_3(self, item):
        if item[1] in doomed and torch.utils.data.get_worker_info() is not None:
            os._exit(3)  # the worker process dies (as if killed or out of memory)
        return original(self, item)

    monkeypatch.setattr(batches.AugmentedImages, "__getitem__", die_in_step_3)
    with pytest.raises(RuntimeError, match=r"(?i)worker"):
        train(cfg)
    assert not (tmp_path / "run" / "model.pt").exists()
    monkeypatch.setattr(batches.AugmentedImages, "__getitem__", original)
    final = train(cfg, resume=True)
    assert_same_weights(final, reference_run)


RUN_FILES = ("checkpoint.pt", "model.pt", "metrics.jsonl")


def snapshot(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RUN_FILES if (run / name).exists()}


def test_a_used_run_folder_is_refused_unless_resume_or_overwrite(
    folder, tmp_path, reference_run, capsys
):
    run = tmp_path / "run"
    cfg = tiny_config(folder, run, steps=2)
    train(cfg)
    before = snapshot(run)
    assert set(before) == set(RUN_FILES)
    with pytest.raises(RunFolderInUse, match=r"--resume .* --overwrite"):
        train(cfg.replace(lr=5e-3))
    assert snapshot(run) == before  # nothing deleted, nothing overwritten
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", "-c", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0], err
    assert snapshot(run) == before
    # --overwrite: the earlier run is replaced by a complete new one
    assert main(["train", "-c", str(recipe), "--steps", "4", "--overwrite"]) == 0
    assert_same_weights(run / "model.pt", reference_run)
    assert losses(run) == losses(reference_run.parent)


def _poison(at_step: int, *, loss: bool):
    """train_step that, at ``at_step``, returns a NaN loss or leaves NaN weights behind."""
    original = training.train_step
    count = [0]

    def step(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        count[0] += 1
        if count[0] == at_step:
            if loss:
                result.loss = float("nan")
            else:
                with torch.no_grad():
                    model.whiten.weight[0, 0] = float("inf")
        return result

    return step


@pytest.mark.parametrize("nan_loss", [True, False], ids=["nan-loss", "inf-weight"])
def test_divergence_fails_and_keeps_the_last_finite_checkpoint(
    folder, tmp_path, monkeypatch, capsys, nan_loss
):
    run = tmp_path / "run"
    cfg = tiny_config(folder, run, steps=4, checkpoint_every=2)
    # the last step diverges: no model.pt, checkpoint.pt still the finite one of step 2
    monkeypatch.setattr(training, "train_step", _poison(4, loss=nan_loss))
    with pytest.raises(TrainingDiverged, match="diverged"):
        train(cfg)
    assert not (run / "model.pt").exists()
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 2
    assert all(
        torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point()
    )
    # through the command line: one line, a failure status
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    monkeypatch.setattr(training, "train_step", _poison(1, loss=nan_loss))
    assert main(["train", "-c", str(recipe), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0], err
    assert not (run / "model.pt").exists() and not (run / "checkpoint.pt").exists()


def test_non_finite_learning_rate_is_refused():
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig.from_dict({"data": "x", "lr": float("inf")})


def test_cli_train_with_overrides(folder, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_config(folder, tmp_path / "x").to_dict()))
    out = tmp_path / "cli-run"
    code = main(
        [
            "train",
            "-c",
            str(path),
            "--steps",
            "1",
            "--output-dir",
            str(out),
            "--loss",
            "triplet",
            "--margin",
            "0.2",
            "--crop-scale",
            "[0.5, 1]",
        ]
    )
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
    sharp = make_loss(cfg.replace(loss="sharp_ap"))
    assert isinstance(sharp, APLoss) and sharp.estimator == "sharp" and sharp.num_bins == 25
    assert make_loss(cfg).estimator == "plain"  # the paper's stays the default
    contrastive = make_loss(cfg.replace(loss="contrastive", margin=0.5, num_hard=3))
    assert isinstance(contrastive, ContrastiveLoss) and contrastive.num_hard == 3
    assert isinstance(make_loss(cfg.replace(loss="triplet")), TripletLoss)
    f = lr_factor(cfg.replace(schedule="cosine", steps=10, warmup_steps=2))
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == pytest.approx(0.0)
    g = lr_factor(cfg.replace(schedule="exponential", lr_decay=0.5))
    assert [g(0), g(3)] == [1.0, 0.125]
    assert lr_factor(cfg.replace(schedule="constant"))(99) == 1.0


def test_num_bins_is_checked_once_when_the_recipe_is_read():
    # sharp_ap needs 4 bins: refused by the recipe, before any data or model is touched
    with pytest.raises(ValueError, match="num_bins must be >= 4 for estimator='sharp', got 3"):
        TrainConfig.from_dict({"data": "missing/", "loss": "sharp_ap", "num_bins": 3})
    with pytest.raises(ValueError, match="num_bins must be an integer >= 2, got 1"):
        TrainConfig.from_dict({"data": "missing/", "num_bins": 1})
    assert TrainConfig.from_dict({"data": "missing/", "num_bins": 3}).num_bins == 3
    with pytest.raises(ValueError, match="num_bins must be >= 4"):  # the same check, at the loss
        APLoss(num_bins=3, estimator="sharp")
    assert TrainConfig().num_bins == APLoss().num_bins == DEFAULT_NUM_BINS  # one default


def test_cli_without_a_command_prints_the_commands_and_fails(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: apretrieval") and "train" in out and "evaluate" in out


def test_cli_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"apretrieval {version('apretrieval')}"


def test_validation_during_training_logs_map_and_keeps_the_best_model(folder, tmp_path):
    from apretrieval.data.revisited import RevisitedDataset
    from apretrieval.pipeline import ExtractionSettings, evaluate_checkpoint
    from test_extraction import fake_benchmark

    bench = tmp_path / "bench"
    fake_benchmark(bench, np.random.default_rng(5), n_db=6)
    run = tmp_path / "run"
    cfg = tiny_config(folder, run, val_dataset="roxford5k", val_root=str(bench), val_every=2)
    train(cfg)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val"] for r in records if "val" in r}
    assert list(vals) == [2, 4]  # every 2 steps, the last one after the run
    assert all(set(v) == {"roxford5k/medium/mAP", "roxford5k/hard/mAP"} for v in vals.values())
    # each score says how it was measured (it is not `evaluate`'s multi-scale figure)
    protocols = {r["val_protocol"] for r in records if "val" in r}
    assert protocols == {"roxford5k, Revisited protocol, single scale (1), images at most 32 px"}
    # The logged numbers are the final model's own, evaluated as `apretrieval evaluate` does.
    settings = ExtractionSettings(scales=(1.0,), max_side=32, num_workers=0, device="cpu")
    final = evaluate_checkpoint(
        str(run / "model.pt"), RevisitedDataset("roxford5k", bench), settings
    )
    assert vals[4]["roxford5k/medium/mAP"] == pytest.approx(final.metrics["medium"].mAP, abs=1e-6)
    assert vals[4]["roxford5k/hard/mAP"] == pytest.approx(final.metrics["hard"].mAP, abs=1e-6)
    # best.pt is the step with the highest Medium mAP (the first one on ties)
    best_step = max(vals, key=lambda s: (vals[s]["roxford5k/medium/mAP"], -s))
    assert load_checkpoint(run / "best.pt")["step"] == best_step
    assert load_checkpoint(run / "checkpoint.pt")["validation"]["best"] == pytest.approx(
        vals[best_step]["roxford5k/medium/mAP"]
    )
    # A mistyped benchmark fails before the first step, naming the file it looked for.
    with pytest.raises(ValueError, match=r"gnd_nowhere\.pkl"):
        train(cfg.replace(val_dataset="nowhere"), overwrite=True)
    with pytest.raises(ValueError, match="need val_dataset"):
        TrainConfig.from_dict({"data": "x", "val_every": 5})
