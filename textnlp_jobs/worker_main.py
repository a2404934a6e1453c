"""The worker processes: one Celery worker per device, and the maintenance worker.

Library code behind ``textnlp-jobs worker``, the launcher and the top-level ``workers/`` entry
points (which only call ``device_main`` / ``maintenance_main``), so an installed wheel starts its
workers without anything from the repository:

    python -m textnlp_jobs.worker_main device --device cuda.0
    python -m textnlp_jobs.worker_main maintenance

A device worker sets ``CUDA_VISIBLE_DEVICES`` before torch is imported, so the process (and its
engine process, which inherits the environment) sees only its own GPU (as ``cuda:0``). The models
and the batching loop run in the engine process (``inference/engine_process.py``); the worker
consumes its generation queues with a consumer step (``generation_consumer.py``) that keeps up to
two jobs per batch slot in flight (2 x the largest ``max_batch`` of the models placed here), so
newcomers wait beside the running batch. Celery's own pool only serves a queue of the worker's
own (two threads). Models are loaded and warmed up before the worker consumes its first message.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from textnlp_jobs.constants import generation_queue
from textnlp_jobs.devices import Device
from textnlp_jobs.errors import ConfigurationError, ErrorCode, InputError, TextNLPError
from textnlp_jobs.settings import Settings, get_settings

if TYPE_CHECKING:
    from textnlp_jobs.db.repository import Routing
    from textnlp_jobs.inference.engine_process import RemoteEngineSide

log = logging.getLogger(__name__)


def pin_device(kind: str, index: int) -> None:
    """Make only this worker's GPU visible; must run before torch is imported."""
    if "torch" in sys.modules:
        raise ConfigurationError("torch was imported before the device was pinned; "
                                 "start device workers through textnlp_jobs.worker_main")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index) if kind == "cuda" else ""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_timeouts(settings: Settings) -> None:
    """Refuse to start when the broker could redeliver a job that is still running, or the
    reconciler could take a job away from a worker still inside the longest allowed run."""
    if not settings.embedded and settings.visibility_timeout <= settings.max_job_seconds:
        raise ConfigurationError(
            f"broker visibility timeout ({settings.visibility_timeout:.0f}s, TEXTNLP_VISIBILITY_TIMEOUT) must "
            f"exceed the longest allowed job ({settings.max_job_seconds:.0f}s, TEXTNLP_MAX_JOB_SECONDS)")
    if settings.lease_seconds <= settings.max_job_seconds:
        raise ConfigurationError(
            f"job lease ({settings.lease_seconds:.0f}s, TEXTNLP_LEASE_SECONDS) must exceed the longest allowed "
            f"job ({settings.max_job_seconds:.0f}s, TEXTNLP_MAX_JOB_SECONDS)")


def worker_hostname(settings: Settings, device: str) -> str:
    """The Celery hostname of ``device``'s worker on this node (what ping-waits address)."""
    return Device.parse(device, settings.node_name).hostname


def maintenance_hostname(settings: Settings, kind: str = "light") -> str:
    """The Celery hostname of this node's light (or heavy) maintenance worker."""
    return f"maintenance@{settings.node_name}" if kind == "light" else f"maintenance-{kind}@{settings.node_name}"


def run_device_worker(device: str, models: Sequence[str] | None = None, *, concurrency: int | None = None,
                      loglevel: str = "INFO", torch_threads: int | None = None) -> int:
    """Start the worker for ``device`` and block until it shuts down; returns its exit status."""
    # Celery configures logging only when the worker starts; model loading comes before that.
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    settings = get_settings()
    try:
        dev = Device.parse(device, settings.node_name)
    except InputError as error:
        raise ConfigurationError(error.message, code=ErrorCode.CONFIG_DEVICE_INVALID) from None
    if dev.node != settings.node_name:
        raise ConfigurationError(f"device {device!r} names node {dev.node!r}, but this node is "
                                 f"{settings.node_name!r}", code=ErrorCode.CONFIG_DEVICE_INVALID)
    pin_device(dev.kind, dev.index)
    check_timeouts(settings)
    references = list(models or settings.models_for_device(dev.local))  # "small" or "small@int8"
    # The engine process starts first: its imports of torch and transformers take most of a
    # worker's start-up, and run beside this process's own. It loads no model before ``start``.
    engine_process = spawn_engine_process(settings, dev, references, torch_threads, loglevel)
    try:
        return _run_device_worker(settings, dev, references, engine_process, concurrency=concurrency,
                                  loglevel=loglevel, torch_threads=torch_threads)
    finally:
        if engine_process is not None:
            engine_process.stop()  # at once when it never started; else a no-op after runtime.stop


def _run_device_worker(settings: Settings, dev: Device, references: list[str],
                       engine_process: RemoteEngineSide | None, *,
                       concurrency: int | None, loglevel: str, torch_threads: int | None) -> int:
    if dev.kind == "cuda":  # only this check needs torch in this process; the engine process loads it anyway
        import torch

        if not torch.cuda.is_available():
            raise ConfigurationError(f"device {dev} requested but CUDA is not available",
                                     code=ErrorCode.CONFIG_DEVICE_UNAVAILABLE)

    from celery.signals import worker_ready

    from textnlp_jobs import generation_consumer
    from textnlp_jobs.celery_app import app
    from textnlp_jobs.db.health import ledger_errors
    from textnlp_jobs.db.session import session_factory
    from textnlp_jobs.inference.device import DeviceRuntime
    from textnlp_jobs.inference.registry import parse_reference
    from textnlp_jobs.liveness import Liveness
    from textnlp_jobs.maintenance.health import announce_device, retire_device
    from textnlp_jobs.metrics.push import DEVICE_WORKER_JOB, start_worker_metrics, stop_worker_metrics
    from textnlp_jobs.publish import publish_and_mark
    from textnlp_jobs.tasks import generation

    names = list(dict.fromkeys(parse_reference(r)[0] for r in references))
    factory = session_factory(settings)

    def republish(routings: Sequence[Routing]) -> None:
        publish_and_mark(app, settings, factory, routings)

    # Registered before the models load, and beating while they load: a second worker for this
    # device refuses at once, and a killed predecessor's running jobs are rescued right away.
    liveness = Liveness(settings, factory, dev, names, republish)
    with ledger_errors(settings):
        liveness.register()
    liveness.start()
    try:
        engine_side = engine_process or load_engine_side(settings, factory, dev, references, torch_threads)
        queues = [generation_queue(m) for m in names] + [dev.queue]
        in_flight = (concurrency or settings.worker_concurrency
                     or 2 * max(settings.batching_for(m).max_batch for m in names))
        runtime = DeviceRuntime(settings, factory, engine_side, worker_name=dev.name, republish=republish)
        runtime.start()  # the models load (in the engine process) and warm up before consuming
        generation.install_runtime(runtime)
        # The generation queues are consumed by a consumer step in groups (generation_consumer.py);
        # Celery's own task consumer only watches a queue of its own.
        generation_consumer.install(app, runtime, queues, prefetch=in_flight, drain_seconds=settings.max_job_seconds)
        start_worker_metrics(settings, DEVICE_WORKER_JOB, dev.local, device=dev.local)
        # Once Celery is up, a full collection should walk only what the jobs make (heap.py).
        worker_ready.connect(freeze_worker_heap, weak=False)
        announce_device(settings, dev.local, dev.hostname)
        log.info("device_worker_starting device=%s models=%s queues=%s in_flight=%d cuda_visible_devices=%s "
                 "torch_device=%s", dev, names, queues, in_flight, os.environ.get("CUDA_VISIBLE_DEVICES"),
                 dev.torch_device)
        try:
            # app.start returns Celery's exit status (worker_main would drop it): a worker that
            # stopped on an unrecoverable error must exit non-zero so its supervisor restarts it.
            status = app.start([
                *quiet_flags(loglevel), "worker", "--pool=threads", "--concurrency=2",
                f"--queues={generation_consumer.control_queue(dev.queue)}", f"--hostname={dev.hostname}",
                f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
            ])
            if getattr(engine_side, "crashed", False):  # its engine process died: restart us
                status = status or 1
            if not status:  # a clean stop: health.check no longer expects this device
                retire_device(settings, dev.local)
        finally:
            stop_worker_metrics()
            generation.install_runtime(None)
            runtime.stop()
    finally:
        liveness.stop()
    return int(status or 0)


def freeze_worker_heap(**_: Any) -> None:
    """Celery's ``worker_ready`` receiver in a device worker: start-up is over (heap.py)."""
    from textnlp_jobs.heap import freeze_start_up_heap

    freeze_start_up_heap("device_worker")


def spawn_engine_process(settings: Settings, dev: Device, references: Sequence[str], torch_threads: int | None,
                         loglevel: str) -> RemoteEngineSide | None:
    """The device's engines and batching loop in a child process (``TEXTNLP_ENGINE_PROCESS``, the
    default), so ledger and broker work in this process never holds the GIL the decode loop needs:
    spawned now, loading at ``start``. None when they run in this process (``load_engine_side``)."""
    if not settings.engine_process:
        return None
    from textnlp_jobs.inference.engine_process import RemoteEngineSide

    side = RemoteEngineSide(dev.local, references, torch_threads=torch_threads, loglevel=loglevel,
                            start_timeout=settings.max_job_seconds + 600)
    side.spawn()
    return side


def load_engine_side(settings: Settings, factory: Any, dev: Device, references: Sequence[str],
                     torch_threads: int | None) -> Any:
    """The device's engines and batching loop in this process, loaded now."""
    from textnlp_jobs.inference.engine_side import LocalEngineSide, prepare_loop_process

    prepare_loop_process(torch_threads)
    return LocalEngineSide.load(settings, factory, dev, references)


def run_maintenance_worker(*, loglevel: str = "INFO", concurrency: int | None = None, only: str | None = None) -> None:
    """The maintenance worker. ``only="light"`` consumes ``textnlp.maintenance`` (reconcile, health,
    cache), ``only="heavy"`` ``textnlp.maintenance.heavy`` (retention, vacuum, reindex); with neither
    it runs both as two supervised processes, so a long heavy task never holds a light task's thread."""
    from textnlp_jobs.maintenance import worker

    if only is None:
        sys.exit(worker.run_both(loglevel=loglevel))
    from textnlp_jobs.celery_app import app
    from textnlp_jobs.maintenance.schedule import period_seconds, schedules
    from textnlp_jobs.metrics.maintenance import record_schedule_periods
    from textnlp_jobs.metrics.push import MAINTENANCE_WORKER_JOB, start_worker_metrics

    queue, threads = worker.queue_and_threads(only)
    settings = get_settings()
    start_worker_metrics(settings, MAINTENANCE_WORKER_JOB, f"maintenance-{only}")
    record_schedule_periods({name: period_seconds(schedule)
                             for name, schedule in schedules(settings).items() if schedule is not None})
    app.worker_main([
        *quiet_flags(loglevel), "worker", "--pool=threads", f"--concurrency={concurrency or threads}",
        f"--queues={queue}", f"--hostname={maintenance_hostname(settings, only)}", f"--loglevel={loglevel}",
        "--without-gossip", "--without-mingle",
    ])


def quiet_flags(loglevel: str) -> list[str]:
    """Celery's global ``--quiet`` (no banner) when the log level is WARNING or above: the banner
    is for operators reading a terminal, and at WARNING nobody asked for it."""
    return ["--quiet"] if logging.getLevelName(loglevel.upper()) in (logging.WARNING, logging.ERROR,
                                                                     logging.CRITICAL) else []


def _fail(error: TextNLPError) -> None:
    print(f"error {error.code}: {error.message}", file=sys.stderr)
    sys.exit(2)


def device_main(argv: Sequence[str] | None = None) -> None:
    """Command line of one device worker (``--device cuda.0``)."""
    parser = argparse.ArgumentParser(description="One Celery worker for one device.")
    parser.add_argument("--device", required=True, help="cuda.N or cpu.N")
    parser.add_argument("--models", default=None, help="comma-separated; default: the placement setting")
    parser.add_argument("--concurrency", type=int, default=None, help="jobs in flight; default 2 x max_batch")
    parser.add_argument("--loglevel", default=os.environ.get("TEXTNLP_LOGLEVEL", "INFO"))
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        status = run_device_worker(args.device, args.models.split(",") if args.models else None,
                                   concurrency=args.concurrency, loglevel=args.loglevel,
                                   torch_threads=args.torch_threads)
    except TextNLPError as error:
        _fail(error)
    if status:
        log.error("device_worker_exit status=%d", status)
        sys.exit(status)


def maintenance_main(argv: Sequence[str] | None = None) -> None:
    """Command line of the maintenance worker."""
    parser = argparse.ArgumentParser(description="The maintenance worker: textnlp.maintenance (light) and "
                                                 "textnlp.maintenance.heavy, each in its own process.")
    parser.add_argument("--loglevel", default=os.environ.get("TEXTNLP_LOGLEVEL", "INFO"))
    parser.add_argument("--concurrency", type=int, default=None, help="threads (with --only)")
    parser.add_argument("--only", choices=["light", "heavy"], default=None, help="run one of the two here")
    args = parser.parse_args(argv)
    try:
        run_maintenance_worker(loglevel=args.loglevel, concurrency=args.concurrency, only=args.only)
    except TextNLPError as error:
        _fail(error)


ROLES = {"device": device_main, "maintenance": maintenance_main}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m textnlp_jobs.worker_main device|maintenance ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ROLES:
        print(f"usage: python -m textnlp_jobs.worker_main {{{'|'.join(ROLES)}}} [options]", file=sys.stderr)
        sys.exit(2)
    ROLES[args[0]](args[1:])


if __name__ == "__main__":
    main()
