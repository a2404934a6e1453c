"""The group result write records the prompt's tokens as the model read them, on both ledgers:
a chat job (which the producer cannot count: the template adds tokens) gets its count with its
result, and a write that brings none keeps what the producer counted."""

from __future__ import annotations

import pytest

from textnlp_jobs.client import Client
from textnlp_jobs.db import repository as repo
from textnlp_jobs.local_stack import LocalStack


@pytest.mark.parametrize("ledger", ["stack", "embedded_stack"])
def test_a_result_records_the_prompt_tokens_the_model_read(ledger: str, request: pytest.FixtureRequest) -> None:
    stack: LocalStack = request.getfixturevalue(ledger)
    client = Client(stack.settings())
    kept, recounted = client.submit_many([{"prompt": "Return a new list", "model": "demo"},
                                             {"prompt": "Raise an exception if", "model": "demo"}])
    assert kept.prompt_tokens is not None
    with client.sessions() as session, session.begin():
        claims = repo.claim_many(session, [kept.id, recounted.id], "test/cpu.0", 60)
        outcome = {job_id: repo.Outcome("text", 1, -0.5, "v", 2, 0.1, 0.2, prompt_tokens=tokens)
                   for job_id, tokens in ((kept.id, None), (recounted.id, 17))}
        written = repo.write_successes(session, [repo.Finished(job_id, claim.job.attempt, outcome[job_id])
                                                 for job_id, claim in claims.items() if claim.job], "test/cpu.0")
    assert written == {kept.id, recounted.id}
    assert client.get(kept.id).prompt_tokens == kept.prompt_tokens  # none brought: the producer's stays
    assert client.get(recounted.id).prompt_tokens == 17


def test_finish_reason_says_whether_the_model_ended_the_text_or_max_new_tokens_cut_it(
        embedded_stack: LocalStack) -> None:
    from textnlp_jobs.display import job_detail, to_jsonable

    client = Client(embedded_stack.settings())
    ended, cut, waiting = client.submit_many([{"prompt": p, "model": "demo", "max_new_tokens": 8}
                                              for p in ("Return a new list", "Read the file and", "If the")])
    with client.sessions() as session, session.begin():
        claims = repo.claim_many(session, [ended.id, cut.id], "test/cpu.0", 60)
        # The end-of-sequence token that ended a text is not one of its tokens_generated.
        outcome = {ended.id: repo.Outcome("a b", 7, -0.5, "v", 2, 0.1, 0.2),
                   cut.id: repo.Outcome("a b c", 8, -0.5, "v", 2, 0.1, 0.2)}
        repo.write_successes(session, [repo.Finished(job_id, claims[job_id].job.attempt, outcome[job_id])
                                       for job_id in outcome], "test/cpu.0")  # type: ignore[union-attr]
    assert [client.get(j.id).finish_reason for j in (ended, cut, waiting)] == ["stop", "length", None]
    assert to_jsonable(client.get(cut.id))["finish_reason"] == "length"  # --json shows it
    assert any("max_new_tokens reached" in str(cell) for cell in job_detail(client.get(cut.id)).columns[1].cells)


@pytest.mark.parametrize("ledger", ["stack", "embedded_stack"])
def test_the_finish_reason_the_worker_recorded_is_the_one_read_back(ledger: str,
                                                                    request: pytest.FixtureRequest) -> None:
    """A stop string written by the last allowed token leaves tokens_generated == max_new_tokens: only
    the engine knows it was a stop. What it recorded is read back; a row without one (written before
    workers recorded it) is still told from its token count."""
    stack: LocalStack = request.getfixturevalue(ledger)
    client = Client(stack.settings())
    stopped_last, unrecorded = client.submit_many([{"prompt": p, "model": "demo", "max_new_tokens": 8}
                                                   for p in ("Return a new list", "Read the file and")])
    with client.sessions() as session, session.begin():
        claims = repo.claim_many(session, [stopped_last.id, unrecorded.id], "test/cpu.0", 60)
        outcome = {stopped_last.id: repo.Outcome("a b", 8, -0.5, "v", 2, 0.1, 0.2, finish_reason="stop"),
                   unrecorded.id: repo.Outcome("a b c", 8, -0.5, "v", 2, 0.1, 0.2)}
        written = repo.write_successes(session, [repo.Finished(job_id, claim.job.attempt, outcome[job_id])
                                                 for job_id, claim in claims.items() if claim.job], "test/cpu.0")
    assert written == {stopped_last.id, unrecorded.id}
    assert client.get(stopped_last.id).finish_reason == "stop"
    assert client.get(unrecorded.id).finish_reason == "length"
    assert [job.finish_reason for job in client.wait([stopped_last.id, unrecorded.id], timeout=5)] == ["stop", "length"]
