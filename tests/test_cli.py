"""The command line's shell: one error layer (one line, exit 2 usage / 1 failure, --debug),
`train --help` generated from TrainConfig, values typed as a person types them."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import pickle
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from apretrieval.cli import main
from apretrieval.cli.errors import describe
from apretrieval.models import build_model, save_checkpoint
from apretrieval.train_config import GROUPS, TrainConfig
from conftest import tiny_train_argv


def run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"apretrieval {command}: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert len(errors[0]) < 600, errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 2 tiny images."""
    root = tmp_path_factory.mktemp("cli_folder")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(2):
            arr = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")
    return root


def tiny(folder, out, *extra: str) -> list[str]:
    return tiny_train_argv(folder, out, "--no-progress", *extra)


# --------------------------------------------------------------------------------------------
# train --help and the values a person types


def _train_parser():
    from apretrieval.cli import build_parser

    parser = build_parser(["train"])
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]


def test_every_train_option_is_documented_in_help(capsys):
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(f.metadata["doc"].split()) in text, f.name  # meaning
        assert f.metadata["group"] in GROUPS
    for action in _train_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
        aliased = action.default is argparse.SUPPRESS  # e.g. --no-progress for --progress
        if action.dest in {f.name for f in dataclasses.fields(TrainConfig)} and not aliased:
            assert "(default: " in action.help, action.dest
    # Groups in order, allowed values and units shown.
    positions = [
        out.index(t)
        for t in (
            "data and augmentation:",
            "\nmodel:",
            "\nloss:",
            "optimisation (batches, Adam, schedule):",
            "\nrun:",
        )
    ]
    assert positions == sorted(positions)
    assert (
        "{ap,tie_aware_ap,sharp_ap,smooth_ap,sup_ap,roadmap,recall_at_k,contrastive,triplet}" in out
        and "[pixels]" in out
    )
    assert "cpu-small" in out  # the bundled recipes are named


def _default_of(help_text: str, flag: str) -> str:
    """The "(default: X)" of ``flag`` in a --help text."""
    text = " ".join(help_text.split())
    start = text.index(f"{flag} ", text.index("options:"))
    opening = text.index("(default: ", start) + len("(default: ")
    return text[opening : text.index(")", opening)]


def test_train_help_shows_the_defaults_of_the_recipe_given(capsys):
    code, plain, _ = run(["train", "--help"], capsys)
    assert code == 0 and "Defaults below are TrainConfig's" in " ".join(plain.split())
    assert (_default_of(plain, "--batch-size"), _default_of(plain, "--backbone")) == (
        "4096",
        "resnet101",
    )
    for argv in (["--config", "cpu-small", "--help"], ["--help", "--config", "cpu-small"]):
        code, out, _ = run(["train", *argv], capsys)
        assert code == 0, argv
        assert "Defaults below are those of the recipe cpu-small" in " ".join(out.split())
        assert _default_of(out, "--batch-size") == "64"  # the recipe's, not TrainConfig's
        assert _default_of(out, "--backbone") == "mobilenet_v2"
        assert _default_of(out, "--crop-scale") == "0.4,1"
        assert _default_of(out, "--num-bins") == "20"  # a key the recipe sets as TrainConfig
        assert _default_of(out, "--lr-decay") == "0.99"  # a key the recipe leaves: TrainConfig's
    code, _, err = run(["train", "--config", "no-such-recipe", "--help"], capsys)
    assert code == 2 and "config file not found" in err


def test_train_help_spells_out_what_each_value_is(capsys):
    out = " ".join(run(["train", "--help"], capsys)[1].split())
    assert "--crop-scale MIN,MAX" in out and "--val-root DIR|none" in out
    assert "--val-dataset NAME|PKL|none" in out
    assert "folder holding the validation benchmark (its jpg/ and gnd_NAME.pkl" in out
    assert "less the cores other programs keep busy" in out  # --threads: what none means
    assert "(none: unchanged)" not in out


def test_print_config_needs_no_data_and_takes_typed_values(capsys):
    code, out, _ = run(
        [
            "train",
            "--config",
            "cpu-small",
            "--print-config",
            "--crop-scale",
            "0.5,1.0",
            "--pretrained",
            "none",
            "--threads",
            "2",
            "--out",
            "r",
            "--workers",
            "0",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["crop_scale"] == [0.5, 1.0] and cfg["pretrained"] is None
    assert (cfg["cpu_threads"], cfg["output_dir"], cfg["num_workers"]) == (2, "r", 0)
    assert cfg["progress"] is False and cfg["backbone"] == "mobilenet_v2"  # the recipe's
    code, out, _ = run(
        ["train", "--config", "cpu-small", "--print-config", "--cpu-threads", "3"], capsys
    )
    assert code == 0 and yaml.safe_load(out)["cpu_threads"] == 3  # the old spelling


def test_without_a_config_the_recipe_follows_the_device(capsys, monkeypatch):
    code, out, err = run(["train", "--print-config", "--device", "cpu"], capsys)
    assert code == 0 and "cpu-small" in err
    assert yaml.safe_load(out)["backbone"] == "mobilenet_v2"
    code, out, err = run(["train", "--print-config", "--device", "cuda"], capsys)
    assert code == 0 and "paper" in err
    assert yaml.safe_load(out)["batch_size"] == 4096
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run(["train", "--print-config"], capsys)
    assert code == 0 and "no GPU" in err and yaml.safe_load(out)["max_side"] == 224


def test_an_option_typo_prints_trains_usage_with_a_suggestion(capsys):
    code, _, err = run(["train", "--config", "cpu-small", "--stepz", "3"], capsys)
    assert code == 2
    assert "usage: apretrieval train" in err and "did you mean --steps?" in err
    code, _, err = run(["trian", "--steps", "3"], capsys)
    assert code == 2 and "did you mean train?" in err


# --------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--num-bins", ".inf"], "num_bins: expected int"),
        (["--lr", ".inf"], "lr must be a finite number"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--crop-scale", "0.5,1.0,2"], "crop_scale: expected"),
        (["--batch-size", "1e400"], "batch_size: expected int"),
        (["--loss", "hinge"], "loss must be one of"),
    ],
)
def test_bad_values_are_one_line_usage_errors(argv, needle, capsys):
    code, _, err = run(["train", "--config", "cpu-small", "--print-config", *argv], capsys)
    assert code == 2
    assert needle in one_error_line(err, "train")


def test_yaml_syntax_errors_and_python_tags_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nlr: [1e-3\nloss: ap\n")
    code, _, err = run(["train", "--config", str(bad), "--print-config"], capsys)
    line = one_error_line(err, "train")
    assert code == 2 and str(bad) in line and "line " in line and "invalid YAML" in line
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("data: !!python/object/apply:os.system ['echo pwned > pwned']\n")
    code, _, err = run(["train", "--config", str(tagged), "--print-config"], capsys)
    line = one_error_line(err, "train")
    assert code == 2 and "line 1" in line and "never executed" in line
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
    code, _, err = run(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "config file not found" in one_error_line(err, "train")


def test_argparse_errors_return_2_from_main(capsys, tmp_path):
    code, _, err = run(
        ["search", "--index", str(tmp_path), "--query", "x.jpg", "--k", "1e10"], capsys
    )
    assert code == 2 and "usage: apretrieval search" in err and "--k" in err
    assert run(["--version"], capsys)[0] == 0
    assert run(["train", "--help"], capsys)[0] == 0


# --------------------------------------------------------------------------------------------
# Runtime failures: exit 1, one line saying what, where and what to do


def test_corrupt_empty_and_truncated_checkpoints(tmp_path, folder, capsys):
    model = build_model("resnet18", out_dim=8)
    good = save_checkpoint(tmp_path / "good.pt", model)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "noise.pt").write_bytes(b"\x00" + noise)  # not a pickle, not a zip
    for name, needle in (
        ("empty.pt", "empty"),
        ("cut.pt", "truncated or corrupt"),
        ("noise.pt", "truncated or corrupt"),
    ):
        code, _, err = run(
            tiny(folder, tmp_path / "run", "--weights", str(tmp_path / name)), capsys
        )
        line = one_error_line(err, "train")
        assert code == 1 and str(tmp_path / name) in line and needle in line


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_checkpoint_is_refused_without_torchs_unsafe_advice(tmp_path, folder, capsys):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "apretrieval-model", "x": _Evil()}, f, protocol=2)
    code, _, err = run(tiny(folder, tmp_path / "run", "--weights", str(evil)), capsys)
    line = one_error_line(err, "train")
    assert code == 1 and "not a plain checkpoint" in line and "executed" in line
    assert "weights_only" not in err and "re-run" not in err
    assert not (tmp_path / "pwned.txt").exists() and not os.path.exists("pwned.txt")


def test_resume_with_a_changed_architecture_is_short(tmp_path, folder, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint(run_dir / "checkpoint.pt", build_model("resnet18", out_dim=16), step=1)
    code, _, err = run([*tiny(folder, run_dir), "--resume"], capsys)
    line = one_error_line(err, "train")
    assert code == 1 and "do not fit" in line and "of another shape" in line
    assert "--resume" in line and len(err) < 1000


def test_output_folder_that_is_a_file(tmp_path, folder, capsys):
    (tmp_path / "taken").write_text("a file")
    code, _, err = run(tiny(folder, tmp_path / "taken"), capsys)
    line = one_error_line(err, "train")
    assert code == 1 and str(tmp_path / "taken") in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu(tmp_path, folder, capsys):
    argv = tiny(folder, tmp_path / "run")
    argv[argv.index("--device") + 1] = "cuda"
    code, _, err = run(argv, capsys)
    line = one_error_line(err, "train")
    assert code == 1 and "CUDA is not available" in line and "--device cpu" in line


def test_debug_flag_and_environment_show_the_traceback(tmp_path, folder, capsys, monkeypatch):
    (tmp_path / "empty.pt").write_bytes(b"")
    argv = tiny(folder, tmp_path / "run", "--weights", str(tmp_path / "empty.pt"))
    code, _, err = run([*argv, "--debug"], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("apretrieval train: error: ")
    monkeypatch.setenv("APRETRIEVAL_DEBUG", "1")
    code, _, err = run(argv, capsys)
    assert code == 1 and "Traceback (most recent call last)" in err


# --------------------------------------------------------------------------------------------
# The error layer itself, on the exceptions the commands meet


def _raised_in_a_worker() -> BaseException:
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise ValueError("cannot decode photo_7.jpg")

    loader = torch.utils.data.DataLoader(Bad(), num_workers=1)
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    return info.value


@pytest.mark.parametrize(
    ("make", "status", "needles"),
    [
        (
            lambda: PermissionError(errno.EACCES, "Permission denied", "/out/x.npy"),
            1,
            ["/out/x.npy", "Permission denied", "permissions"],
        ),
        (
            lambda: OSError(errno.ENOSPC, "No space left on device", "/out/x.npy"),
            1,
            ["/out/x.npy", "no space left on / writing /out/x.npy", "free some disk space"],
        ),
        (
            lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", "/out/f/x"),
            1,
            ["/out/f/x", "is a file, not a folder"],
        ),
        (
            lambda: __import__("PIL.Image").Image.DecompressionBombError(
                "Image size (300000000 pixels) exceeds limit"
            ),
            1,
            ["exceeds limit", "too large"],
        ),
        (
            lambda: RuntimeError("Found no NVIDIA driver on your system."),
            1,
            ["CUDA is not available", "--device cpu"],
        ),
        (
            lambda: AssertionError("Torch not compiled with CUDA enabled"),
            1,
            ["CUDA is not available"],
        ),
        (lambda: ValueError("k must be <= 1000, got 10000000000"), 2, ["k must be"]),
        (
            lambda: OverflowError("cannot convert float infinity to integer"),
            2,
            ["out of range", "infinity"],
        ),
        (_raised_in_a_worker, 1, ["in a data-loading worker", "cannot decode photo_7.jpg"]),
        (lambda: KeyError("surprise"), 1, ["KeyError", "--debug"]),
    ],
)
def test_describe(make, status, needles):
    message, code = describe(make())
    assert code == status
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_describe_yaml_errors_and_exit_codes_carried_by_exceptions():
    with pytest.raises(yaml.YAMLError) as info:
        yaml.safe_load("a: [1")
    message, code = describe(info.value)
    assert code == 2 and "not valid YAML" in message and "\n" not in message

    class Special(ValueError):
        exit_code = 1

    assert describe(Special("corrupt file"))[1] == 1


def test_no_error_line_is_long_even_for_long_messages():
    message, _ = describe(RuntimeError("x" * 10_000))
    assert len(message) < 600 and not re.search(r"\s{2,}", message)
