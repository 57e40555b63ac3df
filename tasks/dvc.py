"""The DVC side of the calibration split: which stage produces a path, and reproducing it.

When the split's path is a stage output of a DVC project, the stage is the one writer:
`dvc repro` decides whether to rerun it, restore it from the run cache, or leave it be, and
records its md5 in dvc.lock. Outside a DVC project the split is sampled directly.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from starfish.errors import StarfishError
from starfish.io import file_digest

log = logging.getLogger(__name__)


def producing_stage(path: str | Path) -> tuple[Path, str] | None:
    """(project root, stage name) of the DVC stage that outputs `path`, or None if none does."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    target = Path(path).resolve()
    try:
        root = Repo.find_root(str(target.parent))
    except NotDvcRepoError:
        return None
    with Repo(root) as repo:
        for stage in repo.index.stages:
            if any(Path(out.fs_path).resolve() == target for out in stage.outs):
                return Path(root), stage.addressing
    return None


def reproduce(root: Path, stage: str) -> None:
    """`dvc repro <stage>` in `root`, with this interpreter's scripts (`starfish`) first on PATH."""
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": scripts + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", stage], cwd=root, env=env,
                            capture_output=True, text=True)
    log.info("dvc repro %s:\n%s", stage, result.stdout.strip())
    if result.returncode != 0:
        raise StarfishError(f"`dvc repro {stage}` failed in {root}: {result.stderr.strip()[-2000:]}")


def file_md5(path: str | Path) -> str:
    """The md5 DVC 3 records for a file in dvc.lock (its bytes' md5)."""
    return file_digest(path, "md5")
