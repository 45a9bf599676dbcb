"""Closed-loop load on `sparsec serve` (loopback only): throughput, latency percentiles, errors.

    python benchmarks/serve_load.py                 # 30 s per scenario, compiles the MiniLM artifacts if needed
    python benchmarks/serve_load.py --seconds 10    # shorter

All against real server processes serving MiniLM on onnxruntime (server defaults unless stated):
  * sweep: dynamic batching with 1, 8 and 32 concurrent clients;
  * batching: the default server vs one started with --max-batch-size 1, at 32 clients;
  * overhead: at one client, each request to the server is paired with a call of the raw backend
    runner (the server's own loader, in this process) on the same text, batch 1: the difference is
    what HTTP + JSON + tokenisation + batching + pooling cost;
  * sparse vs dense: the artifact vs the same model compiled at sparsity 0, served the same way, at
    1 and 32 clients, on each of `--backends` that is available (onnxruntime ignores sparsity;
    DeepSparse, static shapes --max-batch-size 4 --seqlen 128, has sparse kernels).
A comparison keeps both servers up and alternates short rounds between them (`--rounds`), so that
other load on the machine falls on both sides alike. Each client keeps one keep-alive connection and
sends one text per request (a docstring of 8-64 words from Python's standard library), the next as
soon as the answer is in. The load generator is a minimal asyncio HTTP/1.1 client, to keep its own
cost small; it shares the machine's cores with the server (loopback).

Prints a table and writes benchmarks/results/serve_load.json. Bounded: `--seconds` per scenario side
and at most `--max-requests` requests per client and round.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from repo_paths import RESULTS, ROOT, repo_relative

ARTIFACTS = ROOT / "benchmarks" / "artifacts"
SPARSE_ARGS = ("--backend", "onnxruntime", "--calib-samples", "32", "--calib-seqlen", "128", "--runs", "5")
STATIC_SEQLEN = 128
STATIC_ARGS = ("--max-batch-size", "4", "--seqlen", str(STATIC_SEQLEN))  # for static-shape backends
DENSE_ARGS = ("--backend", "onnxruntime", "--sparsity", "0", "--allocation", "uniform", "--method", "magnitude",
              "--runs", "5")


# -- texts and the artifacts ---------------------------------------------------------------------------------
def load_texts(max_tokens: int, count_tokens, limit: int = 512) -> list[str]:
    """Docstrings of 8-64 words that fit `max_tokens` (the static seqlen of DeepSparse runs)."""
    from compiler.calibration import stdlib_corpus

    texts = [" ".join(t.split()) for t in stdlib_corpus("eval")]
    texts = [t for t in texts if 8 <= len(t.split()) <= 64]
    return [t for t, n in zip(texts, count_tokens(texts)) if n <= max_tokens][:limit]


def ensure_artifact(path: Path, args: tuple[str, ...]) -> Path:
    if not (path / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "compiler.cli", "compile", "minilm", "-o", str(path), *args, "--force"]
        print("compiling:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return path


# -- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------------------------
class Connection:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
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
        return status, headers, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


def ok_answer(status: int, data: bytes) -> bool:
    return status == 200 and data.startswith(b'{"object":"list"')


@dataclass
class Measure:
    """Merged over rounds: latencies (s), errors, wall seconds, batcher items and calls."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0
    items: float = 0.0
    calls: float = 0.0

    def row(self, name: str, clients: int, server_args: tuple[str, ...]) -> dict:
        lat = np.array(self.latencies or [np.nan]) * 1e3
        p50, p90, p99 = (round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99))
        return {"scenario": name, "clients": clients, "server_args": list(server_args), "seconds": round(self.wall, 2),
                "requests": len(self.latencies), "errors": self.errors,
                "throughput_rps": round(len(self.latencies) / self.wall, 2) if self.wall else 0.0,
                "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
                "mean_batch_size": round(self.items / self.calls, 2) if self.calls else 0.0}


async def closed_loop(port: int, clients: int, bodies: list[bytes], seconds: float, max_requests: int,
                      out: Measure) -> None:
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        conn = Connection(port)
        i, sent = k * 7919, 0
        while time.perf_counter() < deadline and sent < max_requests:
            body = bodies[i % len(bodies)]
            i, sent = i + 1, sent + 1
            start = time.perf_counter()
            try:
                status, _, data = await conn.post("/v1/embeddings", body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                out.errors += 1
                await conn.close()
                continue
            elapsed = time.perf_counter() - start
            if not ok_answer(status, data):
                out.errors += 1
                continue
            if sent == 1:  # one full answer per client is parsed and checked
                assert len(json.loads(data)["data"][0]["embedding"]) > 0
            out.latencies.append(elapsed)
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    out.wall += time.perf_counter() - start


# -- server processes --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """`sparsec serve ARTIFACT ARGS` on a free loopback port, for a `with` block; records the exit code."""

    def __init__(self, name: str, artifact: str, args: tuple[str, ...], log_dir: Path):
        self.name, self.artifact, self.args = name, artifact, args
        self.port = free_port()
        self.log = log_dir / f"{name}.log"
        self.exit_code: int | None = None

    def __enter__(self) -> "ServerProc":
        from runtimes.serve.app import wait_until_ready

        cmd = [sys.executable, "-m", "compiler.cli", "serve", self.artifact, "--port", str(self.port), *self.args]
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        state = wait_until_ready(f"http://127.0.0.1:{self.port}", 180, self.proc)
        if state != "ready":
            self.proc.kill()
            raise RuntimeError(f"server {self.name} {state} instead of getting ready: {self.log.read_text()[-2000:]}")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.exit_code = self.proc.wait(60)

    def batch_totals(self) -> tuple[float, float]:
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        sums = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            for kind in sums:
                if line.startswith(f"sparsec_batch_size_{kind}{{") and 'kind="embeddings"' in line:
                    sums[kind] += float(line.rsplit(" ", 1)[1])
        return sums["sum"], sums["count"]


def alternate(servers: list[ServerProc], clients: int, bodies: list[bytes], seconds: float, rounds: int,
              max_requests: int) -> dict[str, Measure]:
    """`rounds` rounds of seconds/rounds on each server in turn, after a short warm-up of each."""
    out = {s.name: Measure() for s in servers}
    for s in servers:
        asyncio.run(closed_loop(s.port, clients, bodies, min(2.0, seconds / 5), max_requests, Measure()))
    for _ in range(rounds):
        for s in servers:
            items0, calls0 = s.batch_totals()
            asyncio.run(closed_loop(s.port, clients, bodies, seconds / rounds, max_requests, out[s.name]))
            items1, calls1 = s.batch_totals()
            out[s.name].items += items1 - items0
            out[s.name].calls += calls1 - calls0
    return out


def server_timing(headers: dict[str, str], metric: str) -> float:
    """Milliseconds of `metric` in a Server-Timing header ("queue;dur=0.1, inference;dur=4.2")."""
    for part in headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == metric:
            return float(dur)
    return float("nan")


def paired_overhead(server: ServerProc, texts: list[str], seconds: float, threads: int) -> dict:
    """One client. Per request: the client's latency and the backend time the server reports in its
    Server-Timing header (same request, same conditions); then the raw runner, in this process, on
    the same text at batch 1."""
    from runtimes.serve.model import ServedModel, open_artifact

    target = open_artifact(server.artifact, "onnxruntime")
    model = ServedModel.load(target, threads=threads, max_batch_size=1)
    seqs = target.text.encode(texts)
    bodies = [json.dumps({"input": t}).encode() for t in texts]

    def raw_feeds(seq: list[int]) -> dict[str, np.ndarray]:
        ids = np.asarray([seq], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if target.signature.input("token_type_ids") is not None:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds

    async def run() -> tuple[list[float], list[float], list[float], int]:
        conn = Connection(server.port)
        served, inside, raw, errors = [], [], [], 0
        deadline = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < deadline:
            k = i % len(bodies)
            i += 1
            start = time.perf_counter()
            status, headers, data = await conn.post("/v1/embeddings", bodies[k])
            served_s = time.perf_counter() - start
            feeds = raw_feeds(seqs[k])
            start = time.perf_counter()
            model.runner.infer(feeds)
            raw_s = time.perf_counter() - start
            if not ok_answer(status, data):
                errors += 1
                continue
            if i > 10:  # the first few warm both paths up
                served.append(served_s * 1e3)
                inside.append(server_timing(headers, "inference"))
                raw.append(raw_s * 1e3)
        await conn.close()
        return served, inside, raw, errors

    served, inside, raw, errors = asyncio.run(run())
    model.close()
    s, i, r = np.array(served), np.array(inside), np.array(raw)
    overhead = s - i  # HTTP + JSON + tokenisation + queueing, per request
    p50 = float(np.median(s))
    return {"requests": len(s), "errors": errors, "server_p50_ms": round(p50, 3),
            "server_p99_ms": round(float(np.percentile(s, 99)), 3),
            "backend_in_server_p50_ms": round(float(np.median(i)), 3),
            "raw_runner_p50_ms": round(float(np.median(r)), 3),
            "raw_runner_p99_ms": round(float(np.percentile(r, 99)), 3),
            "overhead_p50_ms": round(float(np.median(overhead)), 3),
            "overhead_fraction_of_server_p50": round(float(np.median(overhead)) / p50, 3),
            "server_p50_minus_raw_runner_p50_ms": round(p50 - float(np.median(r)), 3)}


def batching_ceiling(artifact: str, texts: list[str], threads: int, batch: int, seconds: float) -> dict:
    """What batching can gain on this backend and machine, with no server at all: the raw runner's
    items/s on groups of `batch` texts of similar length (padded to the group's longest) against
    the same texts one at a time, alternating for `seconds` in total. A server's batching gain cannot
    exceed this ratio by much: HTTP and tokenisation cost the same per request either way."""
    from runtimes.serve.model import ServedModel, open_artifact

    target = open_artifact(artifact, "onnxruntime")
    model = ServedModel.load(target, threads=threads, max_batch_size=batch)
    seqs = target.text.encode(texts)

    def feeds(group: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(q) for q in group)
        ids = np.zeros((len(group), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, q in enumerate(group):
            ids[row, :len(q)], mask[row, :len(q)] = q, 1
        out = {"input_ids": ids, "attention_mask": mask}
        if target.signature.input("token_type_ids") is not None:
            out["token_type_ids"] = np.zeros_like(ids)
        return out

    # best case for batching: groups of texts of neighbouring lengths (little padding), as the server's
    # length buckets aim for; "arrival order" groups show what padding costs without them
    by_length = sorted(seqs, key=len)
    groups = [[by_length[(g * batch + k) % len(seqs)] for k in range(batch)] for g in range(len(seqs) // batch or 1)]
    batched, single = [feeds(g) for g in groups], [[feeds([q]) for q in g] for g in groups]
    model.runner.infer(batched[0])
    model.runner.infer(single[0][0])
    spent = {"batched": 0.0, "single": 0.0}
    items = {"batched": 0, "single": 0}
    deadline, i = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        g = i % len(groups)
        i += 1
        start = time.perf_counter()
        model.runner.infer(batched[g])
        spent["batched"] += time.perf_counter() - start
        start = time.perf_counter()
        for f in single[g]:
            model.runner.infer(f)
        spent["single"] += time.perf_counter() - start
        items["batched"] += batch
        items["single"] += batch
    model.close()
    rate = {k: items[k] / spent[k] for k in spent}
    return {"batch": batch, "groups_run": i, "raw_items_per_s_batched": round(rate["batched"], 1),
            "raw_items_per_s_single": round(rate["single"], 1), "gain": round(rate["batched"] / rate["single"], 3)}


def backend_available(name: str) -> tuple[bool, str]:
    from compiler.errors import SparsecError
    from compiler.registry import Registry

    try:
        return Registry.default().get_backend(name).available()
    except SparsecError as exc:
        return False, exc.one_line()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="Measured seconds per scenario (and side).")
    ap.add_argument("--rounds", type=int, default=5, help="Alternating rounds in a comparison.")
    ap.add_argument("--max-requests", type=int, default=100_000, help="Cap of requests per client and round.")
    ap.add_argument("--artifact", help="Sparse MiniLM artifact (default: compiled into benchmarks/artifacts/).")
    ap.add_argument("--dense-artifact", help="Dense reference artifact (default: MiniLM compiled at sparsity 0).")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--threads", type=int, default=0, help="--threads for the servers (0 = their default).")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--backends", default="onnxruntime,deepsparse",
                    help="Backends for sparse vs dense (unavailable ones are skipped).")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    ap.add_argument("--ceiling-only", action="store_true",
                    help="Only measure the raw runner's batching ceiling and add it to an existing --out.")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    sparse = str(ensure_artifact(Path(args.artifact) if args.artifact else ARTIFACTS / "minilm-sparse", SPARSE_ARGS))
    dense = None if args.skip_dense else str(ensure_artifact(
        Path(args.dense_artifact) if args.dense_artifact else ARTIFACTS / "minilm-dense", DENSE_ARGS))
    common = ("--no-access-log", "--log-level", "warning") + (("--threads", str(args.threads)) if args.threads else ())
    threads = args.threads or (os.cpu_count() or 1)
    clients = [int(c) for c in args.clients.split(",")]
    most, least = max(clients), min(clients)
    from runtimes.serve.model import open_artifact

    tokenizer = open_artifact(sparse, "onnxruntime").text
    texts = load_texts(STATIC_SEQLEN, lambda ts: [len(ids) for ids in tokenizer.encode(ts)])
    bodies = [json.dumps({"input": t}).encode() for t in texts]
    if args.ceiling_only:
        report = json.loads(args.out.read_text())
        report["ceiling"] = ceiling = batching_ceiling(sparse, texts, threads, 16, args.seconds)
        report["summary"]["raw_runner_batching_gain_ceiling"] = ceiling["gain"]
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"raw runner, batch {ceiling['batch']} vs 1: {ceiling['raw_items_per_s_batched']} vs "
              f"{ceiling['raw_items_per_s_single']} items/s = {ceiling['gain']}x; wrote {args.out}")
        return
    log_dir = ARTIFACTS / "serve_load_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    servers: list[ServerProc] = []

    def section(title: str) -> None:
        print(f"{title}...", flush=True)

    batching = ServerProc("batching", sparse, common, log_dir)
    single = ServerProc("batch1", sparse, (*common, "--max-batch-size", "1"), log_dir)
    servers += [batching, single]
    with batching, single:
        for c in clients:
            section(f"sweep: {c} clients, {args.seconds:.0f} s")
            m = alternate([batching], c, bodies, args.seconds, 1, args.max_requests)["batching"]
            rows.append(m.row(f"batching-{c}", c, common))
        section(f"batching vs --max-batch-size 1 at {most} clients, {args.rounds} alternating rounds")
        pair = alternate([batching, single], most, bodies, args.seconds, args.rounds, args.max_requests)
        rows.append(pair["batching"].row(f"batching-{most}-paired", most, common))
        rows.append(pair["batch1"].row(f"batch1-{most}-paired", most, single.args))
        section(f"overhead at 1 client vs the raw runner, {args.seconds:.0f} s")
        overhead = paired_overhead(batching, texts, args.seconds, threads)
    section(f"batching ceiling: the raw runner at batch 16 vs batch 1, {args.seconds:.0f} s")
    ceiling = batching_ceiling(sparse, texts, threads, 16, args.seconds)
    dense_rows: dict[str, tuple[dict, dict]] = {}
    for backend in ([b.strip() for b in args.backends.split(",") if b.strip()] if dense else []):
        ok, reason = backend_available(backend)
        if not ok:
            print(f"skipping sparse vs dense on {backend}: {reason}", flush=True)
            continue
        extra = (*common, "--backend", backend, *(STATIC_ARGS if backend == "deepsparse" else ()))
        d_server = ServerProc(f"dense-{backend}", dense, extra, log_dir)
        s_server = ServerProc(f"sparse-{backend}", sparse, extra, log_dir)
        servers += [d_server, s_server]
        with d_server, s_server:
            for c in sorted({least, most}):
                section(f"sparse vs dense on {backend} at {c} clients, {args.rounds} alternating rounds")
                pair = alternate([s_server, d_server], c, bodies, args.seconds, args.rounds, args.max_requests)
                key = f"{backend}-{c}"
                dense_rows[key] = (pair[s_server.name].row(f"sparse-{key}", c, extra),
                                   pair[d_server.name].row(f"dense-{key}", c, extra))
                rows += list(dense_rows[key])

    by = {r["scenario"]: r for r in rows}
    b, s1 = by[f"batching-{most}-paired"], by[f"batch1-{most}-paired"]
    summary = {
        "batching_throughput_gain_at_max_clients": (round(b["throughput_rps"] / s1["throughput_rps"], 2)
                                                    if s1["throughput_rps"] else None),
        "server_overhead_ms_at_1_client": overhead["overhead_p50_ms"],
        "server_overhead_fraction_of_p50": overhead["overhead_fraction_of_server_p50"],
        "raw_runner_batching_gain_ceiling": ceiling["gain"],
        "total_errors": sum(r["errors"] for r in rows) + overhead["errors"],
        "all_servers_exited_0": all(s.exit_code == 0 for s in servers),
    }
    for key, (sp, dn) in dense_rows.items():
        summary[f"sparse_over_dense_throughput_{key}_clients"] = round(sp["throughput_rps"] / dn["throughput_rps"], 3)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
              "seconds": args.seconds, "rounds": args.rounds, "texts": len(texts),
              "artifacts": {"sparse": repo_relative(sparse), "dense": dense and repo_relative(dense)}, "results": rows,
              "overhead": overhead, "ceiling": ceiling,
              "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    header = (f"{'scenario':<24}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'batch':>8}"
              f"{'errors':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['scenario']:<24}{r['clients']:>8}{r['throughput_rps']:>10.1f}{r['p50_ms']:>10.2f}{r['p90_ms']:>10.2f}"
              f"{r['p99_ms']:>10.2f}{r['mean_batch_size']:>8.1f}{r['errors']:>8}")
    print(f"1 client: server p50 {overhead['server_p50_ms']:.2f} ms, of which backend (Server-Timing) p50 "
          f"{overhead['backend_in_server_p50_ms']:.2f} ms; overhead p50 {overhead['overhead_p50_ms']:.2f} ms; "
          f"raw runner alone p50 {overhead['raw_runner_p50_ms']:.2f} ms")
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
