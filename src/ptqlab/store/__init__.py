"""ptqlab.store: what the study keeps: results, the identities they are keyed by, the cache, quantized models.

- :mod:`.runs`: the SQLite store (WAL, one transaction per finished run, leases for running ones),
  :class:`Store`, :class:`RunRecord`, :class:`SweepEntry`.
- :mod:`.schema`: the store's SQL schema, its version, migrations and :func:`check_store`.
- :mod:`.identity`: run ids, quantized-model and quantized-weights keys, provenance (package versions, git
  revision, the code's fingerprint).
- :mod:`.cache`: the disk cache under ``$PTQLAB_CACHE`` (its entries, emptying it, the LRU size bound).
- :mod:`.qmodels`: the one store of quantized models by weights key (weights and grids), which runs write
  and export reads; the only module here that imports torch (not imported by this package's face).

The results store (runs, schema, identity, cache) imports the standard library, :mod:`ptqlab.metrics`,
:mod:`ptqlab.errors` and :mod:`ptqlab.schema` (the run configuration an identity hashes) only; nothing in
the package imports study, report, export or the CLI, and the compute stack (compile, pipeline, eval,
methods, nn) never imports it. The study writes it; report, export, the CLI and the API read it.
"""

from .identity import (
    code_fingerprint,
    git_revision,
    machine_info,
    normalized,
    package_versions,
    qmodel_key,
    run_id,
    weights_key,
)
from .runs import KILL_AT_ENV, Metric, RunRecord, Store, SweepEntry
from .schema import SCHEMA_VERSION, check_store, migrate

__all__ = [
    "KILL_AT_ENV",
    "SCHEMA_VERSION",
    "Metric",
    "RunRecord",
    "Store",
    "SweepEntry",
    "check_store",
    "code_fingerprint",
    "git_revision",
    "migrate",
    "normalized",
    "machine_info",
    "package_versions",
    "qmodel_key",
    "run_id",
    "weights_key",
]
