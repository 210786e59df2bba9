"""A run records the machine it was computed on (CPU model, instruction-set extensions, cores, memory)."""

from __future__ import annotations

import os
import platform

from ptqlab.cli.runs import describe_machine
from ptqlab.store import machine_info
from ptqlab.store.identity import _cpuinfo

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw amx_tile amx_bf16 avx512_bf16 hypervisor

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse4_2 avx avx2
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes
"""


def test_cpuinfo_gives_the_first_processors_name_and_the_kernel_choosing_flags_in_a_fixed_order():
    name, isa = _cpuinfo(INTEL)
    assert name == "Intel(R) Xeon(R) Processor"
    assert isa == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"]
    assert _cpuinfo(ARM) == (None, [])  # no model name, none of the x86 flags
    assert _cpuinfo("") == (None, [])


def test_machine_info_describes_this_machine():
    info = machine_info()
    assert info["arch"] == platform.machine() and info["cores"] == os.cpu_count()
    assert info["system"] == platform.system()
    if platform.system() == "Linux":
        assert isinstance(info["cpu"], str) and info["cpu"]
        assert int(info["memory_bytes"]) > 2**28
        if platform.machine() == "x86_64":
            assert "avx2" in info["isa"]  # the suite's machines: x86-64 with AVX2 at least


def test_describe_machine_is_one_line_with_what_is_known():
    line = describe_machine({"cpu": "Example CPU", "cores": 2, "memory_bytes": 24 * 2**30, "isa": ["avx2", "fma"]})
    assert line == "Example CPU, 2 cores, 24.0 GiB, avx2 fma"
    assert describe_machine({"arch": "aarch64"}) == "aarch64"


def test_the_machine_is_part_of_a_runs_provenance():
    from ptqlab.report.cite import provenance_rows
    from ptqlab.report.runs import RunView
    from ptqlab.store import RunRecord

    record = RunRecord(id="abc", qmodel_key="q", model="m", model_fingerprint="1-ff", architecture=None,
                       config={"model": "m"}, status="done", created_at="2026-01-01T00:00:00+00:00",
                       machine={"cpu": "Example CPU", "cores": 2, "isa": ["avx2", "fma"]})
    rows = provenance_rows(RunView(record))
    assert rows["machine cpu"] == "Example CPU" and rows["machine cores"] == "2"
    assert rows["machine isa"] == '["avx2", "fma"]'
    record.machine = {}  # runs stored before machines were recorded have none
    assert not any(k.startswith("machine ") for k in provenance_rows(RunView(record)))
