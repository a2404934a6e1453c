"""The Redis transport's bulk path keeps kombu's unacked bookkeeping: what a bulk pop records is what
kombu records for one message (so its restore brings the messages back), and acks gathered in
``acks_together`` leave Redis only when the block closes, all together."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from textnlp_jobs.broker_transport import TRANSPORT, QoS

pytestmark = [pytest.mark.integration]

QUEUE = "textnlp.test.bulk"


@pytest.fixture
def broker(redis_url: str) -> Iterator[tuple[Connection, redis.Redis]]:
    connection = Connection(redis_url, transport=TRANSPORT)
    plain = redis.Redis.from_url(redis_url)
    try:
        yield connection, plain
    finally:
        connection.release()
        for key in plain.scan_iter(match="*"):  # this test's scratch database number only
            plain.delete(key)
        plain.close()


def publish(connection: Connection, count: int) -> Queue:
    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    producer = Producer(connection.default_channel)
    for i in range(count):
        producer.publish({"n": i}, exchange=queue.exchange, routing_key=QUEUE, declare=[queue], serializer="json")
    return queue


def consume(connection: Connection, queue: Queue, prefetch: int, want: int) -> tuple[Any, list[Any]]:
    received: list[Any] = []
    channel = connection.channel()
    consumer = Consumer(channel, queues=[queue], callbacks=[lambda body, message: received.append(message)],
                        accept=["json"])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    while len(received) < want:
        connection.drain_events(timeout=5)
    return channel, received


def test_a_bulk_pop_records_each_message_as_kombu_does_and_kombu_restores_them(
        broker: tuple[Connection, redis.Redis], monkeypatch: pytest.MonkeyPatch) -> None:
    connection, plain = broker
    queue = publish(connection, 12)
    recorded_together: list[int] = []
    append_many = QoS.append_many
    monkeypatch.setattr(QoS, "append_many", lambda qos, messages: (recorded_together.append(len(messages)),
                                                                   append_many(qos, messages)))
    channel, received = consume(connection, queue, prefetch=10, want=10)
    assert len(received) == 10
    assert recorded_together == [9]  # one blocking pop, then the free prefetch slots in one more
    qos = channel.qos
    entries = {tag.decode(): json.loads(value) for tag, value in plain.hgetall(qos.unacked_key).items()}
    assert set(entries) == {m.delivery_tag for m in received}
    assert {tag.decode() for tag in plain.zrange(qos.unacked_index_key, 0, -1)} == set(entries)
    for message in received:
        raw, exchange, routing_key = entries[message.delivery_tag]
        assert raw == message._raw and exchange == QUEUE and routing_key == QUEUE
    assert [m.payload["n"] for m in received] == list(range(10))

    # A consumer that died holding them: kombu's own restore puts every one back on the queue.
    qos.restore_unacked()
    assert plain.llen(QUEUE) == 12
    assert plain.hlen(qos.unacked_key) == 0


def test_acks_together_reach_redis_when_the_block_closes(broker: tuple[Connection, redis.Redis]) -> None:
    connection, plain = broker
    queue = publish(connection, 8)
    channel, received = consume(connection, queue, prefetch=8, want=8)
    qos = channel.qos
    with qos.acks_together():
        for message in received[:6]:
            message.ack()
        assert plain.hlen(qos.unacked_key) == 8  # held until the block closes
    assert plain.hlen(qos.unacked_key) == 2
    assert plain.zcard(qos.unacked_index_key) == 2
    assert qos.can_consume_max_estimate() == 6  # the slots are free again
    received[6].ack()  # outside the block: at once, as kombu does
    assert plain.hlen(qos.unacked_key) == 1
