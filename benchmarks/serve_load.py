"""Closed-loop load on `sparsec serve` (loopback only): throughput, latency percentiles, errors.

    python benchmarks/serve_load.py                 # 30 s per scenario, compiles the MiniLM artifacts if needed
    python benchmarks/serve_load.py --seconds 10    # shorter

Scenarios, all against real server processes serving the MiniLM artifact on onnxruntime:
  * dynamic batching (server defaults) with 1, 8 and 32 concurrent clients;
  * --max-batch-size 1 with 32 clients (what batching buys);
  * the raw backend runner in-process at batch 1 on the same texts, versus the server's latency at one
    client: the server's overhead (HTTP + JSON + tokenisation + batching + pooling);
  * the dense reference (the same model compiled at sparsity 0) served the same way, at 1 and 32 clients.
Each client keeps one keep-alive connection and sends one text per request (a docstring of 8-64 words
from Python's standard library), then the next as soon as the answer is in. The load generator is a
minimal asyncio HTTP/1.1 client, so that the client's own cost stays small next to the server's; it
runs on the same machine as the server (loopback), which shares the CPU cores with it.

Prints a table and writes benchmarks/results/serve_load.json. Bounded: every scenario runs `--seconds`
and at most `--max-requests` requests per client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ARTIFACTS = ROOT / "benchmarks" / "artifacts"
SPARSE_ARGS = ("--backend", "onnxruntime", "--calib-samples", "32", "--calib-seqlen", "128", "--runs", "5")
DENSE_ARGS = ("--backend", "onnxruntime", "--sparsity", "0", "--allocation", "uniform", "--method", "magnitude",
              "--runs", "5")


@dataclass(frozen=True)
class Scenario:
    name: str
    artifact: str
    clients: int
    server_args: tuple[str, ...] = ()


@dataclass
class Result:
    scenario: str
    artifact: str
    clients: int
    server_args: list[str]
    seconds: float
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch_size: float
    server_exit_code: int


# -- texts and the artifacts -------------------------------------------------------------------------------
def load_texts(limit: int = 512) -> list[str]:
    from compiler.calibration import stdlib_corpus

    texts = [" ".join(t.split()) for t in stdlib_corpus("eval")]
    return [t for t in texts if 8 <= len(t.split()) <= 64][:limit]


def ensure_artifact(path: Path, args: tuple[str, ...]) -> Path:
    if not (path / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "compiler.cli", "compile", "minilm", "-o", str(path), *args, "--force"]
        print("compiling:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return path


# -- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------------------------
class Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def closed_loop(port: int, clients: int, texts: list[str], seconds: float, max_requests: int) -> tuple[list[float], int]:
    bodies = [json.dumps({"input": t}).encode() for t in texts]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal errors
        conn = Connection("127.0.0.1", port)
        i = k * 7919
        sent = 0
        while time.perf_counter() < deadline and sent < max_requests:
            body = bodies[i % len(bodies)]
            i += 1
            sent += 1
            start = time.perf_counter()
            try:
                status, data = await conn.post("/v1/embeddings", body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                await conn.close()
                continue
            elapsed = time.perf_counter() - start
            if status != 200 or not data.startswith(b'{"object":"list"'):
                errors += 1
                continue
            if sent == 1:  # check one full answer per client
                assert len(json.loads(data)["data"][0]["embedding"]) > 0
            latencies.append(elapsed)
        await conn.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, errors


# -- server processes --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: str, port: int, args: tuple[str, ...], log: Path) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "compiler.cli", "serve", artifact, "--port", str(port), *args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in 180 s: {log.read_text()[-2000:]}")


def batch_stats(port: int) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("sparsec_batch_size_sum{") and 'kind="embeddings"' in line:
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith("sparsec_batch_size_count{") and 'kind="embeddings"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def run_scenario(sc: Scenario, texts: list[str], seconds: float, max_requests: int, log_dir: Path) -> Result:
    port = free_port()
    proc = start_server(sc.artifact, port, sc.server_args, log_dir / f"{sc.name}.log")
    try:
        asyncio.run(closed_loop(port, sc.clients, texts, min(2.0, seconds / 5), max_requests))  # warm-up
        items0, calls0 = batch_stats(port)
        start = time.perf_counter()
        latencies, errors = asyncio.run(closed_loop(port, sc.clients, texts, seconds, max_requests))
        wall = time.perf_counter() - start
        items1, calls1 = batch_stats(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    calls = calls1 - calls0
    return Result(sc.name, Path(sc.artifact).name, sc.clients, list(sc.server_args), round(wall, 2), len(latencies),
                  errors, round(len(latencies) / wall, 2), *(round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)),
                  round((items1 - items0) / calls, 2) if calls else 0.0, code)


def raw_runner_latency(artifact: str, texts: list[str], seconds: float, threads: int) -> dict[str, float]:
    """The backend runner alone (the server's own loader), batch 1, on the same texts: p50/p99 ms."""
    from runtimes.server_model import ServedModel, open_artifact

    target = open_artifact(artifact, "onnxruntime")
    model = ServedModel.load(target, threads=threads, max_batch_size=1)
    seqs = target.text.encode(texts)
    runner = model.runner
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        seq = seqs[i % len(seqs)]
        i += 1
        ids = np.asarray([seq], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if target.signature.input("token_type_ids") is not None:
            feeds["token_type_ids"] = np.zeros_like(ids)
        start = time.perf_counter()
        runner.infer(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    model.close()
    arr = np.array(times)
    return {"runs": len(times), "p50_ms": round(float(np.percentile(arr, 50)), 3),
            "p99_ms": round(float(np.percentile(arr, 99)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="Measured seconds per scenario.")
    ap.add_argument("--max-requests", type=int, default=100_000, help="Cap of requests per client per scenario.")
    ap.add_argument("--artifact", help="Sparse MiniLM artifact (default: compiled into benchmarks/artifacts/).")
    ap.add_argument("--dense-artifact", help="Dense reference artifact (default: MiniLM compiled at sparsity 0).")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--threads", type=int, default=0, help="--threads for the server (0 = its default).")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    sparse = str(ensure_artifact(Path(args.artifact) if args.artifact else ARTIFACTS / "minilm-sparse", SPARSE_ARGS))
    dense = None if args.skip_dense else str(ensure_artifact(
        Path(args.dense_artifact) if args.dense_artifact else ARTIFACTS / "minilm-dense", DENSE_ARGS))
    common = ("--no-access-log", "--log-level", "warning") + (("--threads", str(args.threads)) if args.threads else ())
    clients = [int(c) for c in args.clients.split(",")]
    most = max(clients)
    scenarios = [Scenario(f"batching-{c}", sparse, c, common) for c in clients]
    scenarios.append(Scenario(f"batch1-{most}", sparse, most, (*common, "--max-batch-size", "1")))
    if dense:
        scenarios += [Scenario(f"dense-batching-{c}", dense, c, common) for c in sorted({min(clients), most})]
    texts = load_texts()
    log_dir = ARTIFACTS / "serve_load_logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    results = []
    for sc in scenarios:
        print(f"running {sc.name} ({sc.clients} clients, {args.seconds:.0f} s)...", flush=True)
        results.append(run_scenario(sc, texts, args.seconds, args.max_requests, log_dir))
    threads = args.threads or (os.cpu_count() or 1)
    raw = raw_runner_latency(sparse, texts, min(args.seconds, 15.0), threads)

    by = {r.scenario: r for r in results}
    one, many, single = by[f"batching-{min(clients)}"], by[f"batching-{most}"], by[f"batch1-{most}"]
    summary = {
        "batching_speedup_at_max_clients": round(many.throughput_rps / single.throughput_rps, 2) if single.throughput_rps else None,
        "server_p50_ms_at_1_client": one.p50_ms,
        "raw_runner_p50_ms": raw["p50_ms"],
        "server_overhead_ms": round(one.p50_ms - raw["p50_ms"], 3),
        "server_overhead_fraction_of_p50": round((one.p50_ms - raw["p50_ms"]) / one.p50_ms, 3),
        "total_errors": sum(r.errors for r in results),
        "all_servers_exited_0": all(r.server_exit_code == 0 for r in results),
    }
    if dense:
        d_many, d_one = by[f"dense-batching-{most}"], by[f"dense-batching-{min(clients)}"]
        summary["sparse_vs_dense_throughput_at_max_clients"] = round(many.throughput_rps / d_many.throughput_rps, 3)
        summary["sparse_vs_dense_p50_at_1_client"] = round(d_one.p50_ms / one.p50_ms, 3)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
              "seconds_per_scenario": args.seconds, "texts": len(texts), "results": [asdict(r) for r in results],
              "raw_runner": raw, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    header = f"{'scenario':<22}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'batch':>8}{'errors':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.scenario:<22}{r.clients:>8}{r.throughput_rps:>10.1f}{r.p50_ms:>10.2f}{r.p90_ms:>10.2f}{r.p99_ms:>10.2f}"
              f"{r.mean_batch_size:>8.1f}{r.errors:>8}")
    print(f"raw runner (batch 1): p50 {raw['p50_ms']:.2f} ms, p99 {raw['p99_ms']:.2f} ms over {raw['runs']} runs")
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
