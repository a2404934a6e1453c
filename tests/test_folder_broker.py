"""The embedded broker never shows a consumer a message that is still being written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from textnlp_jobs.folder_broker import Channel

_ROUND_TRIP = """
import os, sys
from kombu import Connection
import textnlp_jobs.celery_app  # installs the transport, as every process does
from textnlp_jobs.folder_broker import Transport
folder = sys.argv[1]
with Connection("filesystem://localhost/", transport_options={"data_folder_in": folder,
                                                              "data_folder_out": folder}) as connection:
    assert isinstance(connection.transport, Transport), type(connection.transport)
    queue = connection.SimpleQueue("textnlp.gen.demo")
    queue.put({"job": "1"})
    names = os.listdir(folder)
    assert [n.endswith(".textnlp.gen.demo.msg") for n in names] == [True], names
    assert queue.get(timeout=10).payload == {"job": "1"}
    queue.close()
print("ok")
"""


def test_filesystem_urls_use_the_atomic_transport(tmp_path: Path) -> None:
    # A fresh process, as a producer or worker is: kombu keeps broker state per transport class
    # across connections, so an earlier test's connections in this process must not shape this one.
    done = subprocess.run([sys.executable, "-c", _ROUND_TRIP, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


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
