"""Every bash block of the docs pages other than docs/pipeline.md (tests/test_docs_commands.py
runs that one), run as written from a folder holding the shipped params.yaml at a tiny budget,
so a command a page shows is a command that works. Only the demo models' training is cut: one
epoch over a slice of the real Fashion-MNIST (the first 2,000 training and 500 test images)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from doc_blocks import shell_blocks
from test_datasets import idx_bytes

from starfish.datasets import FASHION_MNIST_ROOT, _read_idx

pytestmark = pytest.mark.slow
PAGES = sorted(f"docs/{page.name}" for page in (Path(__file__).resolve().parents[1] / "docs").glob("*.md")
               if page.name != "pipeline.md")
TINY = {"heal": {"steps": 4}, "evaluate": {"max_samples": 200}}
SLICE = {"train": 2000, "t10k": 500}
SUBSTITUTIONS = [(r"--epochs \d+", "--epochs 1"), (r"^starfish train ", "starfish train --data-root fmnist-slice ")]


def fashion_mnist_slice(folder: Path) -> None:
    """The first images of each split of the installed Fashion-MNIST, as IDX files."""
    folder.mkdir()
    for split, count in SLICE.items():
        for stem in (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"):
            (folder / stem).write_bytes(idx_bytes(_read_idx(Path(FASHION_MNIST_ROOT) / f"{stem}.gz")[:count]))


def sandbox(repo_root: Path, folder: Path) -> Path:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"]["checkpoint"] = str(repo_root / params["model"]["checkpoint"])
    for section, fields in TINY.items():
        params.setdefault(section, {}).update(fields)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "data" / "demo").mkdir(parents=True)
    fashion_mnist_slice(folder / "fmnist-slice")
    return folder


@pytest.mark.parametrize("page", PAGES)
def test_every_command_on_the_page_runs(page: str, repo_root: Path, tmp_path: Path) -> None:
    blocks = shell_blocks((repo_root / page).read_text())
    if not blocks:
        pytest.skip(f"{page} shows no commands")
    folder = sandbox(repo_root, tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for number, lines in enumerate(blocks):
        commands = []
        for line in lines:
            for written, here in SUBSTITUTIONS:
                line = re.sub(written, here, line)
            commands.append(line)
        script = "set -euo pipefail\n" + "\n".join(commands)
        run = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"{page} block {number}:\n{script}\n{run.stderr[-3000:]}"
    written = [word for lines in blocks for line in lines for word in re.findall(r"--out (\S+)", line)]
    assert written and all((folder / path).is_file() for path in written), written
