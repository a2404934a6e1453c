"""Names shared by producers, workers and operators: queues, task names, key prefixes."""

from __future__ import annotations

from typing import Final

GENERATION_QUEUE_PREFIX: Final = "textnlp.gen."
DEVICE_QUEUE_PREFIX: Final = "textnlp.gpu."
QUALITY_QUEUE: Final = "textnlp.quality"
MAINTENANCE_QUEUE: Final = "textnlp.maintenance"
# Long maintenance (retention, vacuum, reindex, quantization): its own queue and threads, so a
# long run never starves the 5-minute reconciler.
MAINTENANCE_HEAVY_QUEUE: Final = "textnlp.maintenance.heavy"
# Messages no consumer can decode or run, and messages of queues no one consumes: inspected and
# requeued by operators, never consumed, never dropped.
DEAD_LETTER_QUEUE: Final = "textnlp.dead_letter"

GENERATE_TASK: Final = "textnlp.generate"
RECONCILE_TASK: Final = "jobs.reconcile"

METRIC_PREFIX: Final = "textnlp_"
REDIS_KEY_PREFIX: Final = "textnlp:"
# Maintenance locks and the RedBeat schedule live under the system prefix but are never expired.
LOCK_KEY_PREFIX: Final = "textnlp:lock:"
REDBEAT_KEY_PREFIX: Final = "textnlp:redbeat:"
# kombu's Redis transport keeps delivered-but-unacked messages under these keys.
KOMBU_UNACKED_KEY: Final = "unacked"
KOMBU_UNACKED_INDEX_KEY: Final = "unacked_index"


def generation_queue(model: str) -> str:
    """The queue every device hosting ``model`` consumes (competing consumers)."""
    return f"{GENERATION_QUEUE_PREFIX}{model}"
