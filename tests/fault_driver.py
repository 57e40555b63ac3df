"""`python tests/fault_driver.py STEP PIDS_FILE -- <flows.compress arguments>`: the compress flow
command, SIGKILLed by itself at the worst moment of STEP.

For a step that writes a file, that moment is right after the output is renamed into place and
before its sidecar is; for `register`, right after the model version row is written. Before
dying, it writes the pids of its children (the temporary Prefect server) to PIDS_FILE.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

OUTPUTS = {"sample_calibration": "calibration.json", "prune": "pruned.safetensors",
           "heal": "healed.safetensors", "quantize": "served.onnx", "evaluate": "metrics.json"}


def die(pids_file: Path) -> None:
    children = [stat.parent.name for stat in Path("/proc").glob("[0-9]*/stat")
                if _ppid(stat) == os.getpid()]
    pids_file.write_text("\n".join(children))
    os.kill(os.getpid(), signal.SIGKILL)


def _ppid(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def main() -> None:
    step, pids_file, separator, *flow_args = sys.argv[1:]
    assert separator == "--"
    pids = Path(pids_file)
    if step == "register":
        from mlflow import MlflowClient

        MlflowClient.set_model_version_tag = lambda *args, **kwargs: die(pids)
    else:
        real_replace = os.replace

        def replace_then_die(src: str, dst: str, *args: object, **kwargs: object) -> None:
            real_replace(src, dst, *args, **kwargs)
            if Path(dst).name == OUTPUTS[step]:
                die(pids)

        os.replace = replace_then_die
    from flows.common import run_cli
    from flows.compress import main as compress_main

    sys.argv = ["flows.compress", *flow_args]
    run_cli(compress_main)


if __name__ == "__main__":
    main()
