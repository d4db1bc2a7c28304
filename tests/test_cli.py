"""`spo` command line: happy path and errors that name the offending flag."""

import numpy as np
import pytest
from PIL import Image

from service.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_generate_same_seed_same_image_and_grid(tmp_path, smoke_model):
    args = ["generate", "--model", str(smoke_model), "--prompt", "a red circle on a blue background", "--seed", "7",
            "--steps", "3", "--guidance", "5"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert main([*args, "--n", "5", "--out", str(tmp_path / "five.png")]) == 0  # a last row with blanks
    assert np.asarray(Image.open(tmp_path / "five.png")).shape == (2 * 64, 4 * 64, 3)
    assert main([*args, "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (64, 4 * 64, 3)  # diffusers' make_image_grid: one row of four, no padding
    # The first tile of the grid is the seed-7 image (batched matmuls may round differently: within 1/255 on average).
    assert np.abs(grid[:, :64].astype(int) - a.astype(int)).mean() <= 1.0


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--model", "/nonexistent/model"], "--model"),
        (["--size", "65x64"], "--size"),
        (["--size", "big"], "--size"),
        (["--steps", "0"], "--steps"),
        (["--n", "0"], "--n"),
    ],
)
def test_generate_errors_name_the_flag(extra, flag, capsys, tmp_path, smoke_model):
    argv = ["generate", "--model", str(smoke_model), "--prompt", "x", "--out", str(tmp_path / "x.png")]
    code, err = _run(argv + extra, capsys)
    assert code == 2
    assert f"argument {flag}" in err
    assert not (tmp_path / "x.png").exists()


def test_data_shapes_command(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--n", "3"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 3
    code, err = _run(["data", "shapes", "--out", str(tmp_path), "--n", "0"], capsys)
    assert code == 2 and "argument --n" in err


def test_train_base_rejects_unknown_preset(capsys, tmp_path):
    code, err = _run(["train", "base", "--preset", "huge", "--out", str(tmp_path)], capsys)
    assert code == 2 and "argument --preset" in err


@pytest.mark.parametrize("flag, value", [("--num-candidates", "1"), ("--continue-from", "loser")])
def test_train_spo_ablation_flags_refuse_bad_values(flag, value, capsys, tmp_path):
    code, err = _run(["train", "spo", "--scorer", "rater", flag, value, "--out", str(tmp_path)], capsys)
    assert code == 2 and f"argument {flag}" in err


def _subcommand_parsers(parser, path=()):
    """(command path, parser) for every leaf command of `spo`."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommand_parsers(sub, (*path, name))
            return
    yield path, parser


def test_every_flag_has_help_and_shows_its_default():
    from service.cli import build_parser

    leaves = list(_subcommand_parsers(build_parser()))
    assert len(leaves) >= 15  # serving, export, generate, data x4, train x4, eval x3
    missing, no_default = [], []
    for path, parser in leaves:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            flag = f"{' '.join(path)} {action.option_strings[-1]}"
            if not action.help:
                missing.append(flag)
            elif action.default not in (None, False) and "%(default)" not in formatter._get_help_string(action):
                no_default.append(flag)
    assert missing == [] and no_default == []


@pytest.mark.parametrize("command", [["train", "base"], ["train", "spm"], ["train", "spo"], ["train", "dpo"]])
def test_preset_lists_its_choices(command, capsys):
    from training.presets import BASE_PRESETS, DPO_PRESETS, SPM_PRESETS, SPO_PRESETS

    presets = {"base": BASE_PRESETS, "spm": SPM_PRESETS, "spo": SPO_PRESETS, "dpo": DPO_PRESETS}[command[1]]
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(sorted(presets)) + "}" in out.replace("\n", "").replace(" ", "")
    code, err = _run([*command, "--preset", "no-such-preset", "--data", ".", "--model", "."], capsys)
    assert code == 2 and "--preset" in err and "invalid choice" in err


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"spo {version('spo-diffusion')}"


def test_export_backend_is_named_as_in_the_manifest(capsys):
    code, err = _run(["export", "--model", "spo-tiny", "--backend", "onnx"], capsys)
    assert code == 2 and "--backend" in err and "onnxruntime" in err


def test_log_level_comes_from_the_settings(monkeypatch, capsys):
    monkeypatch.setenv("SPO_TORCH_THREADS", "zero")  # every command reads its settings through one object
    code, err = _run(["data", "shapes", "--out", "x", "--n", "1"], capsys)
    assert code == 2 and "SPO_TORCH_THREADS" in err
