"""What training prints: the start summary, setting warnings, plain lines off a terminal."""

from __future__ import annotations

import io
from dataclasses import replace

from apretrieval.run_log import RunFacts, StepLog, setting_warnings, start_summary, step_line
from apretrieval.train_config import TrainConfig

FACTS = RunFacts(
    images=120,
    classes=14,
    drawable_classes=12,
    dropped_files=3,
    top_level_files=2,
    device="cpu",
    threads="threads: 2 (2 cores - 0 loader worker(s))",
    world_size=1,
    weights="imagenet pretrained",
    start_step=0,
    streamed=False,
    out_dim=64,
)


def config(**kw) -> TrainConfig:
    base = dict(
        data="photos",
        batch_size=32,
        images_per_class=4,
        steps=50,
        warmup_steps=5,
        out_dim=64,
        pca_images=100,
        whiten=True,
        whiten_init="pca",
        output_dir="runs/x",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_start_summary_says_what_was_found_and_ignored():
    text = "\n".join(start_summary(config(), FACTS))
    assert "photos: 120 images, 14 classes (12 drawable: with 2 or more images" in text
    assert "2 classes with a single image" in text
    assert "3 missing or unreadable files" in text
    assert "2 files at the folder top" in text
    assert "cpu, threads: 2 (2 cores - 0 loader worker(s)), float32" in text
    assert "weights: imagenet pretrained" in text
    assert "50 steps of 32 images" in text and "from step 0" in text and "runs/x" in text
    assert "out_dim 64," in text
    resumed = "\n".join(
        start_summary(config(), FACTS.__class__(**{**vars(FACTS), "start_step": 7}))
    )
    assert "resuming at step 7" in resumed


def test_no_warning_for_sound_settings():
    assert setting_warnings(config(), FACTS) == []


def test_warnings_for_settings_that_cannot_work_as_meant():
    (w,) = setting_warnings(config(warmup_steps=50), FACTS)
    assert "warm-up (50 steps) is as long as the run (50 steps)" in w
    (w,) = setting_warnings(config(amp="fp16"), FACTS)
    assert "--amp fp16 on CPU is many times slower" in w
    assert setting_warnings(config(amp="fp16"), replace(FACTS, device="cuda:0")) == []


def test_small_data_is_described_not_warned_about():
    """A small training set (the README's first run) runs clean: how its batches are drawn
    and what the PCA initialisation spans are summary lines, not warnings."""
    small = config(batch_size=64, pca_images=40)  # 64 / 4 = 16 classes per batch, 12 drawable
    assert setting_warnings(small, FACTS) == []
    text = "\n".join(start_summary(small, FACTS))
    assert "would be 16 classes; the data has 12, so each batch holds all of them" in text
    assert "about 5.33 images each" in text
    assert "from 40 training images, which span 39 of the 64 dimensions" in text
    assert "the other 25 start at the scale of the weakest spanned one" in text
    # out_dim: null (the backbone's width) is compared by the dimension the network has
    wide_facts = replace(FACTS, out_dim=1280)
    wide = "\n".join(start_summary(config(out_dim=None, pca_images=300), wide_facts))
    assert "from 120 training images, which span 119 of the 1280 dimensions" in wide
    # enough images and classes: no batch note, a plain PCA line; nothing learnt on resume
    plain = start_summary(config(), FACTS)
    assert not any(line.startswith("batches:") for line in plain)
    assert "whitening: PCA initialisation from 100 training images" in plain
    resumed = start_summary(config(pca_images=40), replace(FACTS, start_step=3))
    assert not any(line.startswith("whitening:") for line in resumed)


def test_plain_lines_every_twentieth_of_the_run():
    out = io.StringIO()
    log = StepLog(100, enabled=True, stream=out)
    for step in range(1, 101):
        log({"step": step, "loss": 1 / step, "lr": 1e-5, "images_per_s": 10.0, "batch_ap": 0.5})
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["1/100"] + [f"{s}/100" for s in range(5, 101, 5)]
    assert lines[-1] == "step 100/100  loss 0.0100  lr 1.00e-05  10.0 img/s"
    silent = io.StringIO()
    StepLog(10, enabled=False, stream=silent)({"step": 10, "loss": 0.1})
    assert silent.getvalue() == ""


def test_step_line_shows_the_batch_ap_and_its_estimate():
    record = {"step": 3, "loss": 0.25, "lr": 2e-4, "images_per_s": 5.5}
    record.update(batch_ap=0.61, batch_ap_q=0.55)
    assert step_line(record, 10) == (
        "step 3/10  loss 0.2500  lr 2.00e-04  5.5 img/s  batch AP 0.610 (AP_Q 0.550)"
    )


def test_the_validation_protocol_is_said_at_start():
    facts = replace(
        FACTS, validation="demo, Revisited protocol, single scale (1), images at most 224 px"
    )
    text = "\n".join(start_summary(config(val_dataset="demo", val_every=10), facts))
    assert "validation: every 10 steps and at the end, Medium/Hard mAP on demo, Revisited" in text
    assert (
        "single scale (1), images at most 224 px (apretrieval evaluate's default: scales 1, "
        in text
    )
    assert "best Medium mAP is kept as best.pt" in text
    assert not any(ln.startswith("validation:") for ln in start_summary(config(), FACTS))
