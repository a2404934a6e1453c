"""Group commit (inference/groups.py): a trickle of items under load is gathered into groups,
while an item after a quiet spell, the group right after it, and everything at shutdown run at
once."""

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


def test_items_trickling_in_under_load_share_one_group() -> None:
    recorder = Recorder()
    runner = GroupRunner("test", recorder.work, spacing=1.0)
    runner.start()
    try:
        runner.submit("a").result(timeout=10)  # after a quiet spell: at once
        runner.submit("b").result(timeout=10)  # the group after it: at once too (a burst's rest)
        futures = [runner.submit(item) for item in "cde"]  # under load now: each alone would be a group
        assert [f.result(timeout=10) for f in futures] == ["C", "D", "E"]
        assert recorder.groups == [["a"], ["b"], ["c", "d", "e"]]
    finally:
        runner.stop(timeout=10)


def test_the_rest_of_a_burst_does_not_wait_for_the_spacing_behind_its_first_item() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    runner = GroupRunner("test", recorder.work, spacing=3600.0)  # an hour: waiting would time out
    runner.start()
    try:
        first = runner.submit("a")  # reaches an idle runner alone, like a burst's first message
        rest = [runner.submit(item) for item in "bc"]
        recorder.gate.set()
        assert [f.result(timeout=10) for f in [first, *rest]] == ["A", "B", "C"]
        assert len(recorder.groups) <= 2
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
    runner.submit("b").result(timeout=10)  # under load from here on
    full = [runner.submit(item) for item in "cde"]  # max_group reached: runs without waiting
    assert [f.result(timeout=10) for f in full] == ["C", "D", "E"]
    late = runner.submit("f")  # would wait an hour for its spacing; stopping runs it now
    runner.stop(timeout=10)
    assert late.done() and late.result() == "F"
    assert recorder.groups == [["a"], ["b"], ["c", "d", "e"], ["f"]]
