"""docs/pipeline.md's bash blocks as scripts that run here: the commands as written, with only
what cannot run here rewritten by a table of (as written, as run) pairs (example hosts,
credentials and ports become loopback ones). What the doc starts in the foreground, servers and
workers, runs in the background in a session of its own, logging to a file of its own; a server
is waited for until it answers. Every such process is listed in `<folder>/started` (pid, log,
command).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import NamedTuple

DOC = "docs/pipeline.md"
# Servers the doc starts in the foreground, and the path that answers once each is up.
SERVERS = {"mlflow server": "/health", "mlflow ui": "/health", "starfish serve": "/ping",
           "prefect server start": "/api/health"}
WORKERS = ("prefect worker start",)  # in the foreground too, with nothing to wait for
WAIT = """import sys, time, httpx
url, log = sys.argv[1:]
for _ in range(480):
    try:
        if httpx.get(url, timeout=2).status_code < 500:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(f"{url} did not answer in 240 s; its log: {log}")
"""


def shell_blocks(text: str) -> list[list[str]]:
    """The doc's ```bash blocks, each as its commands: continuation lines joined, comments and
    blank lines dropped."""
    blocks = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines = (re.sub(r"\s+#.*$", "", line).strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines())
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def as_script(lines: list[str], subs: list[tuple[str, str]], folder: Path) -> str:
    """One bash script for a block: its commands in order (an export carries to the next line),
    each rewritten by `subs` in order (a rewrite may make one command two lines), servers and
    workers started in the background, and servers waited for."""
    (folder / "wait.py").write_text(WAIT)
    script = ["set -euo pipefail"]
    commands = []
    for line in lines:
        for written, here in subs:
            line = line.replace(written, here)
        commands += line.split("\n")
    for number, line in enumerate(commands):
        server = next((name for name in SERVERS if re.match(rf"^(\w+=\S+ )*{name}\b", line)), None)
        worker = next((name for name in WORKERS if re.match(rf"^(\w+=\S+ )*{name}\b", line)), None)
        if server is None and worker is None:
            script.append(line)
            continue
        name = server or worker
        port = re.search(r"--port (\d+)", line).group(1) if server else str(number)
        log = folder / f"{name.replace(' ', '-')}-{port}.log"
        script += [f"{line.replace(name, 'setsid ' + name, 1)} > {log} 2>&1 &",
                   f"printf '%s\\t%s\\t%s\\n' $! {log} {shlex.quote(line)} >> {folder / 'started'}"]
        if server:
            script.append(f"{sys.executable} {folder / 'wait.py'} http://127.0.0.1:{port}{SERVERS[server]} {log}")
    return "\n".join(script) + "\n"


class Started(NamedTuple):
    pid: int
    log: Path
    command: str


def started(folder: Path) -> list[Started]:
    """The processes the scripts started in the background, in order."""
    listed = folder / "started"
    rows = (line.split("\t", 2) for line in listed.read_text().splitlines()) if listed.exists() else ()
    return [Started(int(pid), Path(log), command) for pid, log, command in rows]


def kill(pid: int) -> None:
    """SIGKILL the process's session (it was started in one of its own)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
