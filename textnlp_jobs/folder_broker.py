"""The embedded broker: kombu's ``filesystem://`` transport, with messages that appear whole.

kombu's own transport creates a message file and then writes it, so a consumer polling the folder
can move the file away while it is still empty and fail on it (``JSONDecodeError``, which stops a
Celery worker). Here a message is written under a name no consumer picks up, then renamed into
place: a rename within one folder is atomic, so a consumer sees the whole message or nothing.

``install()`` makes ``filesystem://`` mean this transport in the current process; ``celery_app``
calls it at import, so every producer, worker and beat process uses it.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu import transport as kombu_transport
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

TRANSPORT_PATH = "textnlp_jobs.folder_broker:Transport"


class Channel(filesystem.Channel):
    """kombu's filesystem channel with atomic message writes."""

    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # Same name scheme as kombu's (ordered by time, then the queue after the first dot), so
        # kombu's reader, purge and size all work unchanged; the scratch name has no ".msg" suffix
        # for the queue, so no reader matches it.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        scratch = os.path.join(self.data_folder_out, f"writing-{uuid.uuid4()}")
        try:
            with open(scratch, "wb") as handle:
                handle.write(str_to_bytes(dumps(message)))
            os.replace(scratch, final)
        except OSError as error:
            try:
                os.remove(scratch)
            except OSError:
                pass
            raise ChannelError(f"Cannot add file {final!r} to directory") from error


class Transport(filesystem.Transport):
    """kombu's filesystem transport using ``Channel`` above."""

    Channel = Channel


def install() -> None:
    """Make ``filesystem://`` URLs use this transport in this process."""
    kombu_transport.TRANSPORT_ALIASES["filesystem"] = TRANSPORT_PATH
    cache = getattr(kombu_transport, "_transport_cache", None)
    if isinstance(cache, dict):
        cache.pop("filesystem", None)
