"""Group commit (inference/groups.py): a trickle of items under load is gathered into groups,
while an item after a quiet spell, and everything at shutdown, runs at once."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from textnlp_jobs.inference.groups import GroupRunner


class Recorder:
    """The groups a runner ran, in order; ``gate`` holds the first group until it is set."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def work(self, items: Sequence[str]) -> list[str]:
        self.gate.wait(30)
        self.groups.append(list(items))
        return [item.upper() for item in items]


def test_an_item_after_a_quiet_spell_runs_alone_at_once() -> None:
    recorder = Recorder()
    runner = GroupRunner("test", recorder.work, spacing=3600.0)  # an hour: waiting would time out
    runner.start()
    try:
        assert runner.submit("a").result(timeout=10) == "A"
        assert recorder.groups == [["a"]]
    finally:
        runner.stop(timeout=10)


def test_items_trickling_in_within_the_spacing_share_one_group() -> None:
    recorder = Recorder()
    runner = GroupRunner("test", recorder.work, spacing=1.0)
    runner.start()
    try:
        runner.submit("a").result(timeout=10)  # starts the spacing
        futures = [runner.submit(item) for item in "bcd"]  # each alone would be a group of one
        assert [f.result(timeout=10) for f in futures] == ["B", "C", "D"]
        assert recorder.groups == [["a"], ["b", "c", "d"]]
    finally:
        runner.stop(timeout=10)


def test_without_spacing_a_group_is_what_waited_while_the_previous_one_ran() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    runner = GroupRunner("test", recorder.work)
    runner.start()
    try:
        first = runner.submit("a")
        futures = [runner.submit(item) for item in "bc"]
        recorder.gate.set()
        assert [f.result(timeout=10) for f in [first, *futures]] == ["A", "B", "C"]
        assert recorder.groups in ([["a"], ["b", "c"]], [["a", "b", "c"]], [["a", "b"], ["c"]])
        assert len(recorder.groups) <= 2
    finally:
        runner.stop(timeout=10)


def test_a_full_group_and_a_stopping_runner_do_not_wait_for_the_spacing() -> None:
    recorder = Recorder()
    runner = GroupRunner("test", recorder.work, max_group=3, spacing=3600.0)
    runner.start()
    runner.submit("a").result(timeout=10)
    full = [runner.submit(item) for item in "bcd"]  # max_group reached: runs without waiting
    assert [f.result(timeout=10) for f in full] == ["B", "C", "D"]
    late = runner.submit("e")  # would wait an hour for its spacing; stopping runs it now
    runner.stop(timeout=10)
    assert late.done() and late.result() == "E"
    assert recorder.groups == [["a"], ["b", "c", "d"], ["e"]]
