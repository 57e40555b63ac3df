"""What the flows share: running a task while keeping its final state, and publishing summaries."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from prefect import Task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from starfish import tracking
from starfish.config import PipelineConfig, recipe_config
from starfish.errors import StarfishError, error_line
from starfish.params import load_config

log = logging.getLogger("starfish.flows")


def absolute(path: str) -> str:
    """Paths enter cache keys absolute, so runs from different folders never share a result."""
    return str(Path(path).resolve())


class StepStates:
    """Calls tasks in order and keeps each one's final state name (`Cached` means it was skipped),
    telling `on_state(step, state)` as each one ends."""

    def __init__(self, on_state: Callable[[str, str], None] | None = None) -> None:
        self.states: dict[str, str] = {}
        self.on_state = on_state

    def __call__(self, task: Task, *args: Any, **kwargs: Any) -> Any:
        state = task(*args, return_state=True, **kwargs)
        self.states[task.name] = state.name
        if self.on_state is not None:
            self.on_state(task.name, state.name)
        return state.result()


def point_config(base: PipelineConfig, sparsity: float | None = None, healer: str | None = None,
                 pruner: str | None = None, structure: str | None = None) -> PipelineConfig:
    """One grid point's config: `base` with its pruner, structure and sparsity, and the heal config
    of the heal recipe `healer` with `base`'s step budget (faithful keeps its own). The same in
    a sweep's threads and in a compress run a sweep started on a worker."""
    prune = {key: value for key, value in (("method", pruner), ("sparsity", sparsity), ("structure", structure))
             if value is not None}
    heal = asdict(recipe_config(base.heal, healer)) if healer is not None else {}
    return base.replace(**({"prune": prune} if prune else {}), **({"heal": heal} if heal else {}))


def ran_on() -> str:
    """Who ran this flow: the Prefect worker that started the process, else host and pid."""
    return os.environ.get("PREFECT__WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}"


def publish(flow: str, rows: list[dict[str, Any]], markdown: str, description: str) -> None:
    """One table artifact and one markdown artifact per flow run, under stable keys."""
    create_table_artifact(table=rows, key=f"{flow}-table", description=description)
    create_markdown_artifact(markdown=markdown, key=f"{flow}-summary", description=description)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as a markdown table; floats with four decimals."""
    if not rows:
        return "(nothing)"
    header = list(rows[0])
    cells = [[f"{row[key]:.4f}" if isinstance(row[key], float) else str(row[key]) for key in header] for row in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(line) + " |" for line in cells)])


def cli(description: str) -> argparse.ArgumentParser:
    """The options every flow's command line has: params file, overrides, tracking URI."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one parameter, e.g. --set heal.steps=500 (repeatable)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    return parser


def check_before_prefect(args: argparse.Namespace) -> None:
    """What a flow command checks before Prefect starts, so bad input ends in one line within
    seconds: the config, and the tracking store (reachable, writable). The flows check the store
    again, for runs started by a deployment."""
    load_config(args.params, args.set)
    tracking.preflight(tracking.tracking_uri(args.tracking_uri))


class _OneLineStarfishErrors(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; a StarfishError is bad input, and
    its message already says what to fix, so the record keeps the message and drops the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (StarfishError, KeyboardInterrupt)):
            record.exc_info, record.exc_text = None, None  # Ctrl-C: the user knows where it came from
        return True


def run_cli(main: Callable[[], None]) -> None:
    """Run a flow's command line: a StarfishError, or a write that found no room or permission,
    raised before or inside the flow, ends it with one line on stderr and exit status 2, as the
    `starfish` command does."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                       if name.startswith("prefect")]
    one_line = _OneLineStarfishErrors()
    for handler in {handler for logger in loggers for handler in logger.handlers}:
        handler.addFilter(one_line)
    try:
        main()
    except (StarfishError, OSError) as exc:
        line = error_line(exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the flow run is marked crashed and no partial output was kept; the same command "
              "resumes from the last finished step", file=sys.stderr)
        sys.exit(130)
