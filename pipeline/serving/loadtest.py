"""`python -m pipeline.serving.loadtest URL [--model exports/finetune] [--clients 8] [--seconds 20]`:
a bounded load and fault test of a served model (`mlflow models serve` of an export).

`--clients` threads send requests to URL's `/invocations` for `--seconds`, then stop: a seeded
mix of valid requests (images of a fixed set, of several sizes, grey, RGB and RGBA, one to
four a request) and each kind of input `serving.contract` refuses. Every valid answer must
equal `serving.predict` on the same pixels written as PNG files (the export folder's ONNX
file through ONNX Runtime) within 1e-6; every invalid request must get HTTP 400 with a
one-line message that neither echoes the input nor carries a stack trace; and the server
must still answer afterwards. Prints requests per second and the valid requests' p50 and p99
latency; exit code 1 on any wrong answer. Loopback or any URL; nothing else is contacted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.serving import contract, predict

SHAPES = ((32, 32, 3), (61, 45, 3), (20, 28, 1), (40, 40, 4), (120, 90, 3))  # the valid images' (H, W, C)
# (name, JSON body's "inputs"): what the contract refuses, as a client would send it
INVALID = (
    ("float in [0, 1]", np.full((1, 16, 16, 3), 0.5).tolist()),
    ("2 channels", np.zeros((1, 8, 8, 2), int).tolist()),
    ("5 channels", np.zeros((1, 8, 8, 5), int).tolist()),
    ("rank 2", np.zeros((8, 8), int).tolist()),
    ("empty batch", []),
    ("NaN", [[[[float("nan"), 0, 0]]]]),
    ("value 300", np.full((1, 4, 4, 3), 300).tolist()),
    ("ragged batch", [np.zeros((4, 4, 3), int).tolist(), np.zeros((5, 4, 3), int).tolist()]),
)


@dataclass
class Tally:
    """What the clients saw; `wrong` lists every answer that broke a rule."""

    latencies: list[float] = field(default_factory=list)  # valid requests, seconds
    valid: int = 0
    invalid: int = 0
    wrong: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def images_and_answers(export: Path, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The valid images and `serving.predict`'s probabilities for each, from the image as a PNG file."""
    rng = np.random.default_rng(seed)
    pictures = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in SHAPES]
    onnx_bytes, meta = predict.read_export(export)
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp:
        paths = []
        for i, picture in enumerate(pictures):
            paths.append(Path(tmp) / f"{i}.png")
            Image.fromarray(picture[..., 0] if picture.shape[2] == 1 else picture).save(paths[-1])
        rows = predict.classify(paths, onnx_bytes, meta, batch_size=8, threads=1)
    return pictures, [np.asarray(row["probabilities"]) for row in rows]


def post(url: str, inputs: object, timeout: float) -> tuple[int, dict]:
    body = json.dumps({"inputs": inputs}).encode()  # NaN goes out as JSON's NaN token, as Python clients send it
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"message": text}


def check_refusal(name: str, status: int, answer: dict) -> str | None:
    """What is wrong with the answer to an invalid request, or None."""
    message = str(answer.get("message", ""))
    if status != 400:
        return f"{name}: HTTP {status}, not 400"
    if "stack_trace" in answer or "Traceback" in message:
        return f"{name}: the answer carries a stack trace"
    if "\n" in message or "[[" in message or len(message) > 300:
        return f"{name}: the message is not one short line: {message[:120]!r}"
    return None


def client(url: str, pictures: list[np.ndarray], expected: list[np.ndarray], deadline: float, seed: int,
           tally: Tally, timeout: float) -> None:
    rng = np.random.default_rng(seed)
    while time.monotonic() < deadline:
        if rng.random() < 0.25:
            name, inputs = INVALID[rng.integers(len(INVALID))]
            status, answer = post(url, inputs, timeout)
            problem = check_refusal(name, status, answer)
            with tally.lock:
                tally.invalid += 1
                tally.wrong += [problem] if problem else []
            continue
        shape = SHAPES[rng.integers(len(SHAPES))]
        chosen = [i for i, p in enumerate(pictures) if p.shape == shape] * int(rng.integers(1, 5))
        started = time.monotonic()
        status, answer = post(url, np.stack([pictures[i] for i in chosen]).tolist(), timeout)
        seconds = time.monotonic() - started
        problem = None
        if status != 200:
            problem = f"valid {shape} x{len(chosen)}: HTTP {status}: {str(answer)[:200]}"
        else:
            got = [np.asarray(row["probabilities"]) for row in answer["predictions"]]
            same = len(got) == len(chosen) and all(
                np.allclose(g, expected[i], atol=1e-6) for g, i in zip(got, chosen, strict=True))
            if not same:
                problem = f"valid {shape} x{len(chosen)}: an answer differs from serving.predict's"
        with tally.lock:
            tally.valid += 1
            tally.latencies.append(seconds)
            tally.wrong += [problem] if problem else []


def run(url: str, export: Path, clients: int = 8, seconds: float = 20, timeout: float = 60,
        over_limit: bool = True) -> dict:
    """The load test; returns its figures and `wrong`, the broken rules (empty: passed). With
    `over_limit`, first one request just over the pixel limit (17 MB of JSON, which MLflow
    parses before the model can refuse it: seconds of the server's time)."""
    url = url.rstrip("/")
    pictures, expected = images_and_answers(export)
    tally = Tally()
    over_limit_seconds = float("nan")
    if over_limit:
        side = int(contract.MAX_REQUEST_PIXELS**0.5) + 1
        started = time.monotonic()
        status, answer = post(url, np.zeros((side, side, 1), np.uint8).tolist(), timeout)
        over_limit_seconds = time.monotonic() - started
        tally.wrong += [p for p in [check_refusal("over the pixel limit", status, answer)] if p]
    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(url, pictures, expected, began + seconds, seed, tally, timeout))
               for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    status, answer = post(url, pictures[0][None].tolist(), timeout)  # still alive and right
    if status != 200 or not np.allclose(answer["predictions"][0]["probabilities"], expected[0], atol=1e-6):
        tally.wrong.append(f"after the load: HTTP {status}, or a wrong answer")
    lat = sorted(tally.latencies) or [float("nan")]
    return {
        "clients": clients, "seconds": round(elapsed, 1), "valid": tally.valid, "invalid": tally.invalid,
        "requests_per_second": round((tally.valid + tally.invalid) / elapsed, 1),
        "valid_per_second": round(tally.valid / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(lat), 1), "p99_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
        "over_limit_refused_in_s": round(over_limit_seconds, 2), "wrong": tally.wrong,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:5001")
    parser.add_argument("--model", type=Path, default=Path("exports/finetune"), help="the export it serves")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be at least 1 and --seconds above 0")
    figures = run(args.url, args.model, args.clients, args.seconds)
    wrong = figures.pop("wrong")
    print(json.dumps(figures))
    for problem in wrong[:20]:
        print(f"wrong: {problem}", file=sys.stderr)
    print(f"loadtest: {'FAILED, ' + str(len(wrong)) + ' wrong answers' if wrong else 'passed'}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
