"""What scripts rely on: data on stdout, everything else on stderr, ``--json`` that parses, full
ids when piped, and every expected error as one line ``error <code>: <message>`` with exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from textnlp_jobs.local_stack import REPO_ROOT, LocalStack

pytestmark = [pytest.mark.slow]

ONE_LINE_ERROR = re.compile(r"^error [a-z_]+\.[a-z_0-9]+: \S.*$")


def cli(stack: LocalStack, *args: str, env: dict[str, str] | None = None, stdin: str | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The command as a script runs it: stdout and stderr are pipes, not a terminal."""
    return subprocess.run([sys.executable, "-m", "textnlp_jobs.cli", *args], cwd=REPO_ROOT,
                          env=stack.process_env({"COLUMNS": "60", **(env or {})}), capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]), done.stderr
    assert lines[0].startswith(f"error {code}: "), lines[0]
    assert done.stdout == ""


def test_submit_prints_only_the_id_on_stdout_so_a_script_can_capture_it(embedded_stack: LocalStack) -> None:
    many = cli(embedded_stack, "submit", "Return a new list", "--model", "demo", "--count", "3")
    assert many.returncode == 0, many.stderr
    ids = many.stdout.splitlines()
    assert len(ids) == 3 and all(uuid.UUID(i) for i in ids)
    assert "submitting" not in many.stdout

    status = cli(embedded_stack, "status", ids[0])
    assert status.returncode == 0 and ids[0] in status.stdout


def test_json_output_of_submit_status_list_and_models_parses(embedded_stack: LocalStack) -> None:
    submitted = cli(embedded_stack, "submit", "Create a new thread", "--model", "demo", "--top-k", "5",
                    "--deadline", "600", "--priority", "4", "--json")
    assert submitted.returncode == 0, submitted.stderr
    [job] = json.loads(submitted.stdout)
    assert job["status"] == "queued" and job["params"]["top_k"] == 5 and job["priority"] == 4
    assert job["deadline"] is not None

    status = json.loads(cli(embedded_stack, "status", job["id"], "--json").stdout)
    assert status["id"] == job["id"] and status["max_attempts"] >= 1
    listing = json.loads(cli(embedded_stack, "jobs", "list", "--status", "queued", "--json").stdout)
    assert [row["id"] for row in listing] == [job["id"]]
    models = json.loads(cli(embedded_stack, "models", "list", "--json").stdout)
    assert {"demo", "tiny"} <= {row["model"] for row in models}
    cli(embedded_stack, "maintenance", "run", "jobs.reconcile", "--dry-run")
    history = json.loads(cli(embedded_stack, "maintenance", "history", "--json").stdout)
    assert history[0]["task"] == "jobs.reconcile" and history[0]["dry_run"] is True


def test_tables_keep_full_ids_when_stdout_is_a_pipe(embedded_stack: LocalStack) -> None:
    ids = cli(embedded_stack, "submit", "Read the file and", "--model", "demo", "--count", "2").stdout.split()
    listing = cli(embedded_stack, "jobs", "list")  # COLUMNS=60: narrower than an id and its row
    assert listing.returncode == 0
    for job_id in ids:
        assert job_id in listing.stdout


def test_cancel_of_a_finished_job_says_so_and_exits_3(embedded_stack: LocalStack) -> None:
    job_id = cli(embedded_stack, "submit", "If the timeout is", "--model", "demo").stdout.strip()
    first = cli(embedded_stack, "cancel", job_id)
    assert first.returncode == 0 and first.stdout.split() == [job_id, "cancelled"]
    again = cli(embedded_stack, "cancel", job_id)
    assert again.returncode == 3
    assert again.stderr.strip().startswith("error jobs.already_finished: ") and "cancelled" in again.stderr


@pytest.mark.parametrize(("args", "code"), [
    (["jobs", "list", "--status", "bogus"], "cli.usage"),
    (["jobs", "list", "--limit", "-1"], "cli.usage"),
    (["submit", "hello", "--count", "-5"], "cli.usage"),
    (["wait"], "cli.usage"),
    (["submit", "hello", "--deadline", "tomorrow-ish"], "cli.usage"),
    (["submit", " ", "--model", "demo"], "input.prompt_empty"),
    (["submit", "hello", "--model", "demo", "--top-p", "7"], "input.top_p_out_of_range"),
    (["status", "not-an-id"], "input.job_id_invalid"),
    (["status", "00000000-0000-0000-0000-000000000000"], "jobs.not_found"),
    (["worker", "--device", "gpu.0"], "config.device_invalid"),
    (["models", "bootstrap", "huge"], "models.unknown_recipe"),
])
def test_bad_arguments_get_one_line_errors_with_exit_2(embedded_stack: LocalStack, args: list[str],
                                                       code: str) -> None:
    assert_one_line_error(cli(embedded_stack, *args), code)


def test_a_bad_setting_is_one_line_naming_the_variable(embedded_stack: LocalStack) -> None:
    done = cli(embedded_stack, "jobs", "list", env={"TEXTNLP_LEASE_SECONDS": "-3"})
    assert_one_line_error(done, "config.invalid")
    assert "TEXTNLP_LEASE_SECONDS" in done.stderr


def test_an_unreachable_postgresql_is_one_line_without_the_password(embedded_stack: LocalStack) -> None:
    url = "postgresql+psycopg://textnlp:hunter2-secret@127.0.0.1:9/textnlp"
    done = cli(embedded_stack, "jobs", "list", env={"TEXTNLP_DATABASE_URL": url})
    assert_one_line_error(done, "ledger.unreachable")
    assert "127.0.0.1:9" in done.stderr and "hunter2" not in done.stderr


def test_an_unreachable_redis_at_submit_prints_the_id_a_one_line_warning_and_exits_3(
    embedded_stack: LocalStack,
) -> None:
    # The job exists in the ledger (the reconciler will send it): never reported as failed.
    done = cli(embedded_stack, "submit", "hello", "--model", "demo",
               env={"TEXTNLP_BROKER_URL": "redis://:hunter2@127.0.0.1:9/0"}, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert len(done.stdout.strip()) == 36 and "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning broker.unreachable: "), done.stderr
    assert "hunter2" not in done.stderr


def test_an_unmigrated_ledger_is_one_line_that_says_what_to_run(embedded_stack: LocalStack, tmp_path: Path) -> None:
    done = cli(embedded_stack, "jobs", "list", env={"TEXTNLP_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"})
    assert_one_line_error(done, "ledger.not_migrated")
    assert "textnlp-jobs db upgrade" in done.stderr


def test_an_unexpected_error_is_one_line_and_says_where_the_traceback_went(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from textnlp_jobs import cli as cli_module
    from textnlp_jobs.cli import jobs
    from textnlp_jobs.settings import reset_settings_cache

    def broken() -> None:
        raise RuntimeError("a bug on purpose")

    monkeypatch.setenv("TEXTNLP_HOME", str(tmp_path))
    reset_settings_cache()
    monkeypatch.setattr(jobs, "_client", broken)
    for argv, debug in ((["textnlp-jobs", "status", str(uuid.uuid4())], False),
                        (["textnlp-jobs", "--debug", "status", str(uuid.uuid4())], True)):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exited:
            cli_module.main()
        assert exited.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error textnlp.unexpected: RuntimeError: a bug on purpose")
        if debug:
            assert "Traceback" in err
        else:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
            saved = Path(re.search(r"full traceback in (\S+?);", last).group(1))  # type: ignore[union-attr]
            assert saved.parent == tmp_path / "errors" and "a bug on purpose" in saved.read_text()
    cli_module.base.state.debug = False
    reset_settings_cache()


def test_wait_on_many_jobs_prints_a_summary_and_status_shows_the_details(embedded_stack: LocalStack) -> None:
    embedded_stack.device_worker("cpu.0").start()
    ids = cli(embedded_stack, "submit", "The default value is", "--model", "demo", "--max-new-tokens", "4",
              "--count", "25").stdout.split()
    assert len(ids) == 25
    waited = cli(embedded_stack, "wait", *ids, "--timeout", "150")
    assert waited.returncode == 0, waited.stderr
    assert "25 jobs: 25 succeeded" in waited.stdout
    assert len(waited.stdout.splitlines()) < 20  # a summary, not a row per job

    as_json = json.loads(cli(embedded_stack, "wait", *ids[:3], "--json").stdout)
    assert [job["status"] for job in as_json] == ["succeeded"] * 3

    detail = cli(embedded_stack, "status", ids[0]).stdout
    for field in ("worker", "attempts", "1 of", "created", "finished", "inference", "demo @ "):
        assert field in detail, detail


def test_the_demo_says_what_the_model_is_and_prints_no_banner_or_warning(embedded_stack: LocalStack) -> None:
    done = cli(embedded_stack, "demo", "--jobs", "2", "--max-new-tokens", "4", timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    everything = done.stdout + done.stderr
    assert "1M-parameter GPT-2" in done.stderr and "models register" in done.stderr
    for noise in ("-------------- ", "celery@", "[config]", "Warning", "WARNING", "warn(", "attention_mask",
                  "Traceback"):
        assert noise not in everything, everything
    assert "Return a new list" in done.stdout  # the results table is the data
    assert "2/2 jobs succeeded" in done.stderr


def test_the_demos_advice_for_a_model_of_your_own_works_as_written(embedded_stack: LocalStack, tiny_model: Path,
                                                                   tmp_path: Path) -> None:
    import shlex
    import signal

    from textnlp_jobs.demo import ABOUT_THE_MODEL

    # The demo's closing advice names three steps in backticks, with PATH and NAME to fill in.
    register, serve, model_option = [shlex.split(step.replace("PATH", str(tiny_model)).replace("NAME", "mine"))
                                     for step in re.findall(r"`([^`]+)`", ABOUT_THE_MODEL)]
    assert register[0] == "textnlp-jobs" and serve[1] == "textnlp-jobs"
    registered = cli(embedded_stack, *register[1:])
    assert registered.returncode == 0, registered.stderr
    submitted = cli(embedded_stack, "submit", "Return a new list", *model_option, "--max-new-tokens", "4")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    # Registered is not served: the producer hears so at once, and the job waits for a worker.
    assert "warning queue.no_consumer: no live device worker serving model 'mine'" in submitted.stderr
    variables = dict(item.split("=", 1) for item in serve[:1])
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "textnlp_jobs.cli", *serve[2:]], cwd=REPO_ROOT,
                                  env=embedded_stack.process_env(variables), stdout=log, stderr=subprocess.STDOUT)
        try:
            waited = cli(embedded_stack, "wait", job_id, "--timeout", "150", timeout=200)
            again = cli(embedded_stack, "submit", "Return a new list", *model_option, "--max-new-tokens", "4")
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
    assert waited.returncode == 0, waited.stdout + waited.stderr + (tmp_path / "worker.log").read_text()[-3000:]
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr  # served now: nothing to say


def test_building_and_registering_a_model_print_no_library_progress_bar(embedded_stack: LocalStack,
                                                                          tmp_path: Path) -> None:
    # Both load the model as a worker would (from_pretrained), which in transformers 5 draws a
    # "Loading weights" bar on stderr; the command's own lines are all a user should see.
    built = cli(embedded_stack, "models", "bootstrap", "tiny", env={"TEXTNLP_MODEL_CACHE": "off"})
    assert built.returncode == 0, built.stderr
    # "registered tiny version V at PATH": register that directory again under another name.
    [line] = [line for line in built.stderr.splitlines() if line.startswith("registered tiny version")]
    own = cli(embedded_stack, "models", "register", line.rsplit(" at ", 1)[1], "--name", "tiny-copy")
    assert own.returncode == 0, own.stderr
    for done in (built, own):
        everything = done.stdout + done.stderr
        assert "Loading weights" not in everything and "\r" not in everything, everything
        assert "registered" in done.stderr


def test_help_reads_as_prose_not_as_the_source_lines(embedded_stack: LocalStack) -> None:
    # The help comes from docstrings wrapped at the source's width: shown as they are, a wide
    # terminal got lines broken mid-sentence and reStructuredText's double backticks.
    for args in (["--help"], ["cancel", "--help"]):
        done = cli(embedded_stack, *args, env={"COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        assert "``" not in done.stdout
    top = cli(embedded_stack, "--help", env={"COLUMNS": "200"}).stdout
    assert "With no settings at all everything runs embedded" in top
    cancel = cli(embedded_stack, "cancel", "--help", env={"COLUMNS": "200"}).stdout
    assert "is left as it was: the command says so" in cancel


def test_submit_chat_sends_the_prompt_through_the_models_chat_template(embedded_stack: LocalStack,
                                                                        tiny_model: Path, tmp_path: Path) -> None:
    from sqlalchemy import select

    from textnlp_jobs.client import Client
    from textnlp_jobs.db.models import Generation, Prompt

    from .model_families import with_chat_template

    chatty = with_chat_template(tiny_model, tmp_path / "chatty")
    assert cli(embedded_stack, "models", "register", str(chatty), "--name", "chatty").returncode == 0
    user_only = cli(embedded_stack, "submit", "--chat", "Return a new list", "--model", "chatty")
    with_system = cli(embedded_stack, "submit", "--system", "Answer briefly.", "-", "--model", "chatty",
                      stdin="Return a new list")
    assert user_only.returncode == 0 and with_system.returncode == 0, user_only.stderr + with_system.stderr
    ids = [uuid.UUID(user_only.stdout.strip()), uuid.UUID(with_system.stdout.strip())]
    with Client(embedded_stack.settings()).sessions() as session:
        stored = dict(session.execute(select(Generation.id, Prompt.text)
                                      .join(Prompt, Prompt.id == Generation.prompt_id)
                                      .where(Generation.id.in_(ids))).all())
    assert json.loads(stored[ids[0]]) == [{"role": "user", "content": "Return a new list"}]
    assert json.loads(stored[ids[1]]) == [{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": "Return a new list"}]
    # A model without a chat template: one clear error, nothing queued.
    refused = cli(embedded_stack, "submit", "--chat", "Return a new list", "--model", "demo")
    assert_one_line_error(refused, "input.no_chat_template")


def test_submit_stop_reads_backslash_n_as_a_newline(embedded_stack: LocalStack) -> None:
    # A shell passes '\n' as two characters; a stop at a line's end is what users mean by it.
    done = cli(embedded_stack, "submit", "Return a new list", "--stop", "\\n", "--stop", "a\\\\b", "--stop", "\\x")
    assert done.returncode == 0, done.stderr
    from textnlp_jobs.client import Client

    job = Client(embedded_stack.settings()).get(done.stdout.strip())
    assert job.params["stop"] == ["\n", "a\\b", "\\x"]  # only \n, \t and \\ are read
    assert_one_line_error(cli(embedded_stack, "submit", "Return a new list", "--stop", ""), "input.stop_invalid")
