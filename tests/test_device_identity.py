"""One device identity: the node, the device, its pinned queue and its worker's hostname."""

from __future__ import annotations

import pytest

from textnlp_jobs.devices import Device
from textnlp_jobs.errors import InputError


@pytest.mark.parametrize(
    ("text", "node", "local", "queue", "hostname"),
    [
        ("cuda.0", "here", "cuda.0", "textnlp.gpu.here.0", "gen-cuda0@here"),
        ("cuda:3", "here", "cuda.3", "textnlp.gpu.here.3", "gen-cuda3@here"),
        ("cpu.1", "here", "cpu.1", "textnlp.gpu.here.cpu1", "gen-cpu1@here"),
        ("box-2.lan/cuda.1", "box-2.lan", "cuda.1", "textnlp.gpu.box-2.lan.1", "gen-cuda1@box-2.lan"),
    ],
)
def test_a_device_names_its_node_queue_and_worker(text: str, node: str, local: str, queue: str,
                                                   hostname: str) -> None:
    device = Device.parse(text, "here")
    assert (device.node, device.local, device.queue, device.hostname) == (node, local, queue, hostname)
    assert device.name == f"{node}/{local}"
    assert Device.parse(device.name, "elsewhere") == device


@pytest.mark.parametrize("text", ["../cuda.0", "./cuda.0", "a/b/cuda.0", "cuda", "cuda.", "tpu.0", "cuda.0 ",
                                  "cuda.1234", "/cuda.0", "", None, 3])
def test_anything_else_is_not_a_device(text: object) -> None:
    with pytest.raises(InputError) as caught:
        Device.parse(text, "here")
    assert caught.value.code == "input.device_invalid"
