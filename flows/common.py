"""What the flows share: running a task while keeping its final state, and publishing summaries."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.artifacts import create_markdown_artifact, create_table_artifact


def absolute(path: str) -> str:
    """Paths enter cache keys absolute, so runs from different folders never share a result."""
    return str(Path(path).resolve())


class StepStates:
    """Calls tasks in order and keeps each one's final state name: `Cached` means it was skipped."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    def __call__(self, task: Task, *args: Any, **kwargs: Any) -> Any:
        state = task(*args, return_state=True, **kwargs)
        self.states[task.name] = state.name
        return state.result()


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
