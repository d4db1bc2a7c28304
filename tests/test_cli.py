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
    assert main([*args, "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[1] > 4 * 64
    # The first tile of the grid is the seed-7 image (batched matmuls may round differently: within 1/255 on average).
    assert np.abs(grid[2:66, 2:66].astype(int) - a.astype(int)).mean() <= 1.0


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
