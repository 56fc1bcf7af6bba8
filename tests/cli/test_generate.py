"""`kiln generate`: writes the images, shows per-step progress, and meets bad input with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kiln.testing import prompt_colour


def kiln(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "kiln.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "kiln.db"}"\n'
        'default_model = "fake"\n'
        "[models.fake]\n"
        f'path = "{tmp_path}"\n'
        'loader = "kiln.testing:load_fake_pipeline"\n'
        "native_size = 32\n"
        "steps = 6\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "kiln", "--config", str(config), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )


def test_generate_writes_each_image_with_its_seed(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    result = kiln(tmp_path, "generate", "a red circle", "-n", "2", "--size", "64x48", "--seed", "5",
                  "-o", str(out))
    assert result.returncode == 0, result.stderr
    first, second = Image.open(tmp_path / "out-1.png"), Image.open(tmp_path / "out-2.png")
    assert first.size == (64, 48)
    assert first.getpixel((0, 0)) == prompt_colour("a red circle", 5)
    assert second.getpixel((0, 0)) == prompt_colour("a red circle", 6)
    assert "6/6" in result.stderr  # the progress bar went through every denoising step


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "big"], "size must look like"),
        (["--size", "99999x8"], "between 8 and"),
        (["--model", "nope"], "The model 'nope' does not exist"),
        (["-o", "out.gif"], "output must end in"),
        (["-o", "missing/dir/out.png"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path, args: list[str], message: str) -> None:
    result = kiln(tmp_path, "generate", "a red circle", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_model_path_is_reported_not_raised(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'default_model = "m"\n[models.m]\npath = "{tmp_path / "nowhere"}"\n')
    result = subprocess.run([sys.executable, "-m", "kiln", "--config", str(config), "generate", "x"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert "model_index.json missing" in result.stderr
    assert "Traceback" not in result.stderr
