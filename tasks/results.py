"""Task results as plain JSON, read back only from records in that form: nothing is unpickled.

Prefect's default result serializer is cloudpickle, and a stored record names the serializer
that reads it, so a tampered record under the results folder would run code on the next cached
run. Its JSON serializer is no cure: its decoder imports and calls classes the data names. Our
task results are small dicts of paths, hashes and numbers, so they are written by `PlainJSON`
(`json.dumps`/`json.loads`, nothing else). The cache policy keeps each result's metadata (which
names its serializer) apart from the result, in `PlainJSONKeyStorage`, which hands Prefect the
metadata only after checking, with `json.loads` alone, that it names `PlainJSON`, and that
the files the result names still hold the content it recorded. A refused record counts as
absent: the task runs again, rewrites its files and writes a clean record. So a cached step
whose output was deleted or changed is rebuilt, in every flow and on every task runner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect.filesystems import LocalFileSystem
from prefect.results import get_default_result_storage
from prefect.serializers import Serializer
from prefect.settings import get_current_settings
from pydantic import Field

from starfish.io import sha256_file

log = logging.getLogger("starfish.flows")
SERIALIZER_TYPE = "starfish-json"


class PlainJSON(Serializer):
    """JSON in and out with no object hooks: dicts, lists, strings, numbers, booleans, null."""

    type: str = Field(default=SERIALIZER_TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True).encode()

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob)


def plain_json_metadata(content: bytes, where: str) -> dict[str, Any]:
    """`content` parsed, if it is result metadata naming `PlainJSON`; otherwise a ValueError naming `where`."""
    try:
        metadata = json.loads(content)
        serializer = metadata["serializer"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{where} is not result metadata of a plain JSON result ({exc!r}); refused") from None
    if serializer != {"type": SERIALIZER_TYPE}:
        raise ValueError(f"{where} declares the serializer {serializer!r}, not {SERIALIZER_TYPE!r}; refused")
    return metadata


def outputs_intact(result: Any) -> bool:
    """Whether a step's result still describes its files: each path there, with the recorded hash."""
    if not isinstance(result, dict) or "path" not in result:
        return True
    paths = [Path(result["path"])] + [Path(result[key]) for key in ("loss_curve",) if key in result]
    if not all(path.is_file() for path in paths):
        return False
    return "sha256" not in result or sha256_file(paths[0]) == result["sha256"]


class PlainJSONKeyStorage(LocalFileSystem):
    """Cache-key records (result metadata) in `cache-keys/` under Prefect's local result folder
    (its `results.local_storage_path` setting, read at each call; the results themselves are
    named by the same keys); any naming a serializer other than `PlainJSON` is refused."""

    _block_type_name = "Starfish Plain JSON Cache Keys"

    def _resolve_path(self, path: str) -> Path:
        base = self.basepath or str(Path(get_current_settings().results.local_storage_path) / "cache-keys")
        return LocalFileSystem(basepath=base)._resolve_path(path)

    def _checked(self, content: bytes, path: str) -> bytes:
        where = str(self._resolve_path(path))
        try:
            metadata = plain_json_metadata(content, where)
            result = json.loads(get_default_result_storage(_sync=True).read_path(metadata["storage_key"], _sync=True))
        except ValueError as exc:
            log.warning("%s", exc)
            raise
        if not outputs_intact(result):
            log.warning("the cached result %s names %s, which is gone or changed; the step runs again",
                        Path(where).name[:16], result["path"])
            raise ValueError(f"{result['path']} is gone or changed")
        return content

    async def aread_path(self, path: str) -> bytes:
        return self._checked(await super().aread_path(path), path)

    def read_path(self, path: str, **dispatch: Any) -> bytes:
        return self._checked(super().read_path(path, _sync=True), path)
