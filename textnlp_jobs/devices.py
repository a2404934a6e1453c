"""One device identity: the node it lives on, the device on that node, its pinned queue and the
Celery hostname of its worker. Every place that names a device goes through ``Device``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from textnlp_jobs.constants import DEVICE_QUEUE_PREFIX
from textnlp_jobs.errors import ErrorCode, InputError

KINDS = ("cuda", "cpu")
_NODE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_PATTERN = re.compile(rf"^(?:(?P<node>{_NODE})/)?(?P<kind>cuda|cpu)[.:](?P<index>\d{{1,3}})$")


@dataclass(frozen=True, order=True)
class Device:
    """A device as operators name it (``cuda.0``, ``cpu.1``, ``node/cuda.0``), on one node."""

    node: str
    kind: str
    index: int

    @classmethod
    def parse(cls, text: object, default_node: str) -> Device:
        """``"cuda.0"``, ``"cuda:0"`` or ``"node/cuda.0"``; anything else raises ``InputError``."""
        match = _PATTERN.match(text) if isinstance(text, str) else None
        if match is None:
            raise InputError("device", f"{text!r} is not a device like 'cuda.0', 'cpu.1' or 'node/cuda.0'",
                             code=ErrorCode.INPUT_DEVICE_INVALID)
        return cls(match["node"] or default_node, match["kind"], int(match["index"]))

    @property
    def local(self) -> str:
        """The device on its own node: ``cuda.0``."""
        return f"{self.kind}.{self.index}"

    @property
    def name(self) -> str:
        """The device across nodes: ``node/cuda.0`` (what the ledger's device registry keys on)."""
        return f"{self.node}/{self.local}"

    @property
    def queue(self) -> str:
        """The device's pinned queue: ``textnlp.gpu.<node>.<index>`` (``cpu<index>`` for a CPU)."""
        suffix = str(self.index) if self.kind == "cuda" else f"cpu{self.index}"
        return f"{DEVICE_QUEUE_PREFIX}{self.node}.{suffix}"

    @property
    def hostname(self) -> str:
        """The Celery hostname of the device's worker: ``gen-cuda0@<node>``."""
        return f"gen-{self.kind}{self.index}@{self.node}"

    @property
    def torch_device(self) -> str:
        # CUDA_VISIBLE_DEVICES pins the process to its GPU, which it then sees as cuda:0.
        return "cuda:0" if self.kind == "cuda" else "cpu"

    def __str__(self) -> str:
        return self.local
