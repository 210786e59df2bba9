"""Run one configuration end to end: load, check, quantize, evaluate, store (one transaction)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..schema import RunConfig
from ..store import RunRecord, Store
from .worker import Worker

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """The stored run, and whether it was computed now or found in the store."""

    record: RunRecord
    reused: bool


def execute(
    cfg: RunConfig, store: Store, *, force: bool = False, progress: bool = True, worker: Worker | None = None,
    reuse: bool = True,
) -> RunOutcome:
    """Run a validated configuration and store the result.

    The configuration is compiled (once), the model loaded, the compiled configuration checked against it
    (errors so far raise and store nothing); then the model goes to the run's device, the FP reference of
    the evaluation is measured there (or read from the disk cache), the model is quantized and evaluated.
    A failure while quantizing or evaluating stores the run with status ``failed`` and the reason. A run
    already finished in the store is returned as it is unless ``force``.

    Args:
        cfg: The configuration (from :func:`~ptqlab.study.config.load_config` or ``parse_config``).
        store: Where results go.
        force: Recompute even when the store has the run.
        progress: Show progress bars.
        worker: The worker to run it (one that keeps what runs share); default: a one-run worker.
        reuse: With the default worker, restore quantized weights an earlier run with the same weights key
            kept (a streamed run's offload directory) rather than quantizing again.

    Returns:
        The stored run record.

    """
    worker = worker or Worker(progress=progress, share=False, reuse=reuse)
    rid = worker.run_id(cfg)
    existing = store.get(rid)
    if existing is not None and existing.status == "done" and not force:
        log.info("run %s is already in the store; not recomputed (use --force)", rid)
        return RunOutcome(existing, reused=True)
    record = worker.run(cfg)
    store.save(record)
    return RunOutcome(record, reused=False)
