"""Run ``ptqlab run CONFIG --store STORE`` with the memory it may add capped at BUDGET bytes (a cgroup).

The process first prepares what does not depend on the model's size (imports, the tokenized corpora),
then moves itself into a new memory cgroup limited to BUDGET: only memory touched from then on is charged
there (page cache of the shards it reads and writes included), and going past it gets the process killed
by the kernel's OOM killer. Usage: ``python capped_run.py BUDGET CONFIG STORE``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import ptqlab.eval.streamed
import ptqlab.pipeline.stream
import ptqlab.study.worker  # noqa: F401 - imported before the cap
from ptqlab.cli import main
from ptqlab.compile import bind, compile_config
from ptqlab.models.loading import load_tokenizer
from ptqlab.models.shards import skeleton
from ptqlab.study.config import load_config


def memory_cgroup() -> tuple[Path, str] | None:
    """A new cgroup this process may enter and its limit file (v1 memory controller or v2), or None."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = Path(f"/sys/fs/cgroup/memory{path}")
            return root / f"ptqlab-cap-{os.getpid()}", "memory.limit_in_bytes"
        if controllers == "" and (Path("/sys/fs/cgroup") / path.lstrip("/") / "cgroup.subtree_control").is_file():
            root = Path("/sys/fs/cgroup") / path.lstrip("/")
            if "memory" in (root / "cgroup.subtree_control").read_text():
                return root / f"ptqlab-cap-{os.getpid()}", "memory.max"
    return None


def main_capped() -> None:
    budget, config, store = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = load_config(config)
    bind(compile_config(cfg), skeleton(cfg.model, torch.float32), load_tokenizer(cfg.model))  # tokenize once
    found = memory_cgroup()
    assert found is not None, "no memory cgroup"
    group, limit = found
    group.mkdir()
    (group / limit).write_text(str(budget))
    (group / "cgroup.procs").write_text(str(os.getpid()))
    print(f"capped at {budget} bytes of new memory in {group}", flush=True)
    raise SystemExit(main(["run", config, "--store", store]))


if __name__ == "__main__":
    main_capped()
