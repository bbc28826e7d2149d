"""`python -m pipeline.serving.predict PATH... [--model exports/finetune] [--format csv|json] [--top 3]`:
classify image files with a shipped model.

Reads the export folder's `model.onnx` and `model.json` (classes, input format, the
preprocessing prepare applied), verified against its SHA256SUMS. Each file goes through
`images.load_for_model` with that preprocessing, exactly what prepare did to the training
images (no train/serve skew), then ONNX Runtime in batches: no torch or TensorFlow import.
Folders are walked recursively for files with an image extension, in sorted order.

Writes one row per file to stdout (or `--out`): path, class, probability and the top-k classes;
`--calibrated` applies the temperature evaluate fitted (model.json `calibration`). A file
that cannot be used (unreadable, truncated, too large, not an image) gets a row with its error.
Exit code 0 when at least one file was classified, 1 when none was, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.evaluation import calibration
from pipeline.frameworks import onnx_format
from pipeline.frameworks.interface import float_batches


def image_paths(paths: list[Path]) -> list[Path]:
    """The files named, and the image files under the folders named (hidden files skipped)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and images.has_image_extension(p.name)
                            and not any(images.is_ignored(part) for part in p.relative_to(path).parts))
        else:
            found.append(path)
    return found


def read_export(folder: Path) -> tuple[bytes, dict]:
    """The ONNX bytes and model.json of an export folder, verified."""
    files.verify_folder(folder, "export")
    meta = json.loads((folder / "model.json").read_text())
    return (folder / "model.onnx").read_bytes(), meta


def load(path: Path, meta: dict) -> np.ndarray:
    """One file as the export's uint8 (H, W, C) input; raises images.Rejected."""
    prep = meta["preprocessing"]
    return images.load_for_model(path, prep["image_size"], prep["channels"], prep["resize"])


def classify(paths: list[Path], onnx_bytes: bytes, meta: dict, batch_size: int, threads: int,
             temperature: float = 1.0) -> list[dict]:
    """A row per path, in order: {'path', 'probabilities'} or {'path', 'error'}. Files are
    decoded a batch at a time while ONNX Runtime runs the batches before them."""
    from tqdm import tqdm

    rows: list[dict] = []
    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=len(paths) < 2 * batch_size, file=sys.stderr)

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(paths), batch_size):
            decoded = []
            for path in paths[start : start + batch_size]:
                try:
                    decoded.append(load(path, meta))
                    rows.append({"path": str(path)})
                except images.Rejected as exc:
                    rows.append({"path": str(path), "error": str(exc)})
            bar.update(min(batch_size, len(paths) - start))
            if decoded:
                yield next(float_batches(np.stack(decoded), len(decoded), meta["input"]["layout"]))

    proba = onnx_format.predict_onnx(onnx_bytes, batches(), threads).astype(np.float64)
    bar.close()
    if temperature != 1.0:
        proba = calibration.scale(proba, temperature)
    good = iter(proba)
    for row in rows:
        if "error" not in row:
            row["probabilities"] = next(good)
    return rows


def render(rows: list[dict], classes: list[str], top: int, fmt: str) -> str:
    out = []
    for row in rows:
        if "error" in row:
            out.append({"path": row["path"], "class": None, "probability": None, "top": [], "error": row["error"]})
            continue
        p = row["probabilities"]
        order = np.argsort(-p, kind="stable")[:top]
        ranked = [{"class": classes[i], "probability": round(float(p[i]), 6)} for i in order]
        out.append({"path": row["path"], "class": ranked[0]["class"], "probability": ranked[0]["probability"],
                    "top": ranked, "error": None})
    if fmt == "json":
        return json.dumps(out, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class", "probability", "top", "error"])
    for r in out:
        ranked = ";".join(f"{t['class']}:{t['probability']:.6f}" for t in r["top"])
        writer.writerow([r["path"], r["class"] or "", "" if r["probability"] is None else f"{r['probability']:.6f}",
                         ranked, r["error"] or ""])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="image files and folders")
    parser.add_argument("--model", type=Path, default=Path("exports/finetune"), help="an export folder")
    parser.add_argument("--format", choices=("csv", "json"), default="csv")
    parser.add_argument("--top", type=int, default=3, help="classes listed per image")
    parser.add_argument("--calibrated", action="store_true", help="apply the export's calibration temperature")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    if args.top < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--top, --batch-size and --threads must be at least 1")
    try:
        onnx_bytes, meta = read_export(args.model)
        missing = [p for p in args.paths if not p.exists()]
        if missing:
            raise PipelineError(f"{missing[0]}: no such file or folder")
        paths = image_paths(args.paths)
        temperature = float(meta.get("calibration", {}).get("temperature", 1.0)) if args.calibrated else 1.0
        rows = classify(paths, onnx_bytes, meta, args.batch_size, args.threads, temperature)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = render(rows, list(meta["classes"]), min(args.top, len(meta["classes"])), args.format)
    if args.out:
        files.write_text(args.out, text)
    else:
        sys.stdout.write(text)
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"predict: {failed} of {len(rows)} files could not be classified (see their error column)",
              file=sys.stderr)
    return 0 if len(rows) > failed else 1


if __name__ == "__main__":
    sys.exit(main())
