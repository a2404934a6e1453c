"""Which queue items are message envelopes kombu can deliver (pure checks, no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from textnlp_jobs.broker_transport import envelope_problem
from textnlp_jobs.dead_letter import dead_letter_record

GOOD: dict[str, Any] = {
    "body": "W1siYSJdLCB7fSwge31d", "content-encoding": "utf-8", "content-type": "application/json",
    "headers": {"task": "textnlp.generate", "id": "x"},
    "properties": {"delivery_tag": "t", "body_encoding": "base64",
                   "delivery_info": {"exchange": "", "routing_key": "textnlp.gen.demo"}},
}


def test_a_real_envelope_has_no_problem() -> None:
    assert envelope_problem(GOOD) is None


@pytest.mark.parametrize(("payload", "problem"), [
    ([1, 2, 3], "envelope_not_an_object"), ("text", "envelope_not_an_object"), (None, "envelope_not_an_object"),
    ({**GOOD, "properties": None}, "envelope_without_properties"),
    ({**GOOD, "properties": {**GOOD["properties"], "delivery_tag": None}}, "envelope_without_delivery_tag"),
    ({**GOOD, "properties": {**GOOD["properties"], "delivery_info": {}}}, "envelope_without_delivery_info"),
    ({**GOOD, "headers": ["task"]}, "headers_not_an_object"),
    ({**GOOD, "body": {"a": 1}}, "body_not_text"),
    ({**GOOD, "body": "%%% not base64"}, "body_not_base64"),
])
def test_every_other_shape_is_named(payload: Any, problem: str) -> None:
    assert envelope_problem(payload) == problem


def test_a_dead_letter_record_keeps_the_message_and_says_why() -> None:
    record = dead_letter_record(b"\xff\xfe", "not_json", source_queue="textnlp.gen.demo", detail="Expecting value")
    assert record["reason"] == "not_json" and record["source_queue"] == "textnlp.gen.demo"
    assert record["message"] == {"base64": "//4="}
    assert dead_letter_record("not json", "not_json")["message"] == "not json"
