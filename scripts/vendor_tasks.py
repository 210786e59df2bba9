"""Convert the task data of ../shared/data into the gzipped JSON lines ptqlab's local lm-eval tasks read.

    python scripts/vendor_tasks.py [SHARED_DATA_DIR]

Writes src/ptqlab/assets/data/tasks/{lambada_openai,piqa,arc_easy,arc_challenge,hellaswag_local}.jsonl.gz
(deterministic: gzip mtime 0). Run once by maintainers; the outputs are committed with their provenance.
"""

from __future__ import annotations

import bz2
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "ptqlab" / "assets" / "data" / "tasks"


def _write(name: str, rows: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.jsonl.gz"
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows")


def lambada(src: Path) -> list[dict]:
    """LAMBADA (OpenAI version): the full passages."""
    return [{"text": json.loads(line)["text"]} for line in (src / "lambada" / "lambada_test.jsonl").open()]


def piqa(src: Path) -> list[dict]:
    """PIQA validation with its labels."""
    docs = [json.loads(line) for line in (src / "piqa" / "valid.jsonl").open()]
    labels = [int(x) for x in (src / "piqa" / "valid-labels.lst").read_text().split()]
    assert len(docs) == len(labels)
    pairs = zip(docs, labels, strict=True)
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in pairs]


def arc(src: Path, part: str) -> list[dict]:
    """ARC test split in the field layout of lm-eval's arc tasks."""
    rows = []
    for line in (src / "arc" / f"ARC-{part}-Test.jsonl").open():
        d = json.loads(line)
        choices = d["question"]["choices"]
        rows.append({"id": d["id"], "question": d["question"]["stem"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                     "answerKey": d["answerKey"]})
    return rows


def hellaswag(src: Path) -> list[dict]:
    """HellaSwag validation from its 6-lines-per-item text (context, label, four endings)."""
    with bz2.open(src / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt") as f:
        lines = f.read().split("\n")
    rows = []
    for i in range(0, len(lines) - 5, 6):
        ctx, label, endings = lines[i], int(lines[i + 1]), lines[i + 2 : i + 6]
        rows.append({"ctx": ctx, "endings": [e.strip() for e in endings], "label": label})
    return rows


def main() -> None:
    """Write every task file."""
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data"
    _write("lambada_openai", lambada(src))
    _write("piqa", piqa(src))
    _write("arc_easy", arc(src, "Easy"))
    _write("arc_challenge", arc(src, "Challenge"))
    _write("hellaswag_local", hellaswag(src))


if __name__ == "__main__":
    main()
