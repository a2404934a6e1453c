"""Archives of deleted ledger rows: gzip JSON lines, one file per day per table, each with a sha256
and a manifest next to it, verified by reading back before anything is deleted.

``generations-2026-08-01.jsonl.gz`` holds one generation per line with its prompt's text, so
``restore`` can put both rows back; ``generations-2026-08-01.jsonl.gz.manifest.json`` records the
table, the day, the row count and the file's sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from textnlp_jobs.db.models import Generation, Prompt, UTCDateTime
from textnlp_jobs.errors import ArchiveError

__all__ = ["ArchiveError", "ArchiveFile", "read_rows", "restore", "verify", "write"]

FORMAT = 1
# Archived columns of a generation; the prompt's own columns ride along under "prompt".
GENERATION_COLUMNS: tuple[str, ...] = tuple(c.name for c in Generation.__table__.columns)
PROMPT_COLUMNS: tuple[str, ...] = tuple(c.name for c in Prompt.__table__.columns)
_UUID_COLUMNS = {"id", "prompt_id"}


@dataclass(frozen=True)
class ArchiveFile:
    """One written (or read) archive: what its manifest says."""

    path: str
    table: str
    day: str
    rows: int
    sha256: str
    format: int = FORMAT

    @property
    def manifest_path(self) -> Path:
        return manifest_path(Path(self.path))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _encode(value: Any) -> Any:
    """JSON for what the ledger holds beyond JSON's own types."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"cannot archive a {type(value).__name__}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _free_name(folder: Path, table: str, day: date) -> Path:
    """``<table>-<day>.jsonl.gz``; a second archive of the same day (rows that expired later) gets
    ``-2``, ``-3``: an existing archive is never overwritten."""
    base = f"{table}-{day.isoformat()}"
    candidate = folder / f"{base}.jsonl.gz"
    n = 1
    while candidate.exists() or manifest_path(candidate).exists():
        n += 1
        candidate = folder / f"{base}-{n}.jsonl.gz"
    return candidate


def write(folder: Path, table: str, day: date, rows: Iterable[Mapping[str, Any]]) -> ArchiveFile:
    """Write ``rows`` to a new archive of ``day`` and its manifest. The file appears under its final
    name only once complete (written to a temporary name, flushed, renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, table, day)
    partial = target.with_name(f".{target.name}.partial")
    count = 0
    try:
        with partial.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5, mtime=0) as handle:
            for row in rows:
                handle.write(json.dumps(row, default=_encode, separators=(",", ":"), ensure_ascii=False)
                             .encode("utf-8"))
                handle.write(b"\n")
                count += 1
            handle.flush()
        with partial.open("rb") as done:
            os.fsync(done.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)  # nothing was marked or deleted; the next run starts over
        raise
    os.replace(partial, target)
    archive = ArchiveFile(str(target), table, day.isoformat(), count, _file_sha256(target))
    manifest_path(target).write_text(json.dumps(archive.as_dict(), indent=2) + "\n")
    return archive


def read_manifest(path: Path) -> ArchiveFile:
    try:
        data = json.loads(manifest_path(path).read_text())
        return ArchiveFile(str(path), data["table"], data["day"], int(data["rows"]), data["sha256"],
                           int(data.get("format", FORMAT)))
    except (OSError, ValueError, KeyError) as error:
        raise ArchiveError(f"{path}: no readable manifest ({error})") from error


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rb") as handle:
        for line in handle:
            yield json.loads(line)


def verify(path: Path, expected_ids: set[str] | None = None) -> ArchiveFile:
    """Read an archive back: its sha256 and row count must match the manifest and, when given,
    its ids must be exactly ``expected_ids``. Raises ArchiveError otherwise."""
    manifest = read_manifest(path)
    actual = _file_sha256(path)
    if actual != manifest.sha256:
        raise ArchiveError(f"{path}: sha256 {actual} does not match the manifest's {manifest.sha256}")
    try:
        ids = [row["id"] for row in read_rows(path)]
    except (OSError, EOFError, ValueError, KeyError) as error:
        raise ArchiveError(f"{path}: unreadable ({error})") from error
    if len(ids) != manifest.rows:
        raise ArchiveError(f"{path}: {len(ids)} rows, the manifest says {manifest.rows}")
    if expected_ids is not None and set(ids) != expected_ids:
        raise ArchiveError(f"{path}: holds {len(set(ids))} ids, {len(expected_ids)} were exported")
    return manifest


def _decode(columns: Iterable[str], row: Mapping[str, Any], table: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in columns:
        value = row.get(name)
        if value is not None and name in _UUID_COLUMNS:
            value = uuid.UUID(value)
        elif value is not None and isinstance(table.c[name].type, UTCDateTime):
            value = datetime.fromisoformat(value)
        out[name] = value
    return out


def restore(factory: sessionmaker[Session], path: Path, batch: int = 1000) -> dict[str, Any]:
    """Load an archive back into the ledger (for audits). Verified first; rows already present are
    left as they are. Restored generations keep ``archived = true``."""
    manifest = verify(path)
    if manifest.table != "generations":
        raise ArchiveError(f"{path}: restoring table {manifest.table!r} is not supported")
    restored = present = 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal restored, present
        with factory.begin() as session:
            ids = [uuid.UUID(r["id"]) for r in pending]
            known = set(session.execute(select(Generation.id).where(Generation.id.in_(ids))).scalars())
            fresh = [r for r in pending if uuid.UUID(r["id"]) not in known]
            prompt_ids = [uuid.UUID(r["prompt"]["id"]) for r in fresh]
            known_prompts = set(session.execute(select(Prompt.id).where(Prompt.id.in_(prompt_ids))).scalars())
            prompts = [_decode(PROMPT_COLUMNS, r["prompt"], Prompt.__table__) for r in fresh]
            prompts = [p for p in {p["id"]: p for p in prompts}.values() if p["id"] not in known_prompts]
            if prompts:
                session.execute(insert(Prompt), prompts)
            rows = [_decode(GENERATION_COLUMNS, r, Generation.__table__) | {"archived": True} for r in fresh]
            if rows:
                session.execute(insert(Generation), rows)
            restored += len(rows)
            present += len(pending) - len(rows)
        pending.clear()

    for row in read_rows(path):
        pending.append(row)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    return {"file": str(path), "sha256": manifest.sha256, "rows": manifest.rows, "restored": restored,
            "already_present": present}
