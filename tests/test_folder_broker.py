"""The embedded broker never shows a consumer a message that is still being written."""

from __future__ import annotations

import os
from pathlib import Path

from kombu import Connection

import textnlp_jobs.celery_app  # noqa: F401  (installs the transport, as every process does)
from textnlp_jobs.folder_broker import Channel, Transport


def test_filesystem_urls_use_the_atomic_transport(tmp_path: Path) -> None:
    folder = str(tmp_path)
    with Connection("filesystem://localhost/", transport_options={"data_folder_in": folder,
                                                                  "data_folder_out": folder}) as connection:
        assert isinstance(connection.transport, Transport)
        queue = connection.SimpleQueue("textnlp.gen.demo")
        queue.put({"job": "1"})
        assert [p.endswith(".textnlp.gen.demo.msg") for p in os.listdir(folder)] == [True]
        assert queue.get(timeout=2).payload == {"job": "1"}
        queue.close()


def test_a_message_appears_only_once_written_whole(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    seen_while_writing: list[list[str]] = []
    real_open = open

    class Watching:
        """A file handle that records what the folder shows while the message is written."""

        def __init__(self, path: str, mode: str) -> None:
            self.handle = real_open(path, mode)

        def write(self, data: bytes) -> int:
            seen_while_writing.append([n for n in os.listdir(tmp_path) if n.endswith(".msg")])
            return int(self.handle.write(data))

        def __enter__(self) -> Watching:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    channel = Channel.__new__(Channel)
    monkeypatch.setattr(Channel, "data_folder_out", str(tmp_path), raising=False)
    monkeypatch.setattr("builtins.open", Watching)
    channel._put("q", {"body": "x" * 1000})
    monkeypatch.undo()
    assert seen_while_writing == [[]]  # nothing a consumer could pick up during the write
    (name,) = os.listdir(tmp_path)
    assert name.endswith(".q.msg") and b"xxxx" in (tmp_path / name).read_bytes()
