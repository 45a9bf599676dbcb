"""Does a speed verdict survive a busy machine? One artifact verified N times as the machine is, then N
times with CPU hogs beside it (issue 13's measurement).

    python benchmarks/verify_noise.py --artifact ART --backend deepsparse --repeats 5 --hogs 2

Each repeat is one `sparsec verify ART --backend B --json` in a fresh process (what a user runs); the
hog phase starts `--hogs` busy-loop processes (pure Python `while True`, one core each) before the
repeat and kills them after. Reported per repeat: the speedup vs dense fp32 on the same backend, its
95 % interval, the verdict and the load average. The check, printed at the end and stored:
- the calm repeats agree: every pair of their intervals overlaps;
- each loaded repeat is `inconclusive`, or its interval contains the calm repeats' median speedup —
  never a confident figure that the calm machine contradicts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from repo_paths import RESULTS, ROOT, repo_relative

HOG = "while True:\n    pass\n"


def verify_once(artifact: Path, backend: str, runs: int, threads: int) -> dict:
    cmd = [str(Path(sys.executable).with_name("sparsec")), "verify", str(artifact), "--backend", backend, "--json",
           "--runs", str(runs), "--threads", str(threads)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    start_json = proc.stdout.find("{")
    if start_json < 0:
        raise RuntimeError(f"verify printed no JSON (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    result = json.loads(proc.stdout[start_json:])
    row = result[backend] if backend in result else result
    est = row["speedup_interval"]
    return {"median": est["median"], "low": est["low"], "high": est["high"], "verdict": est["verdict"],
            "reason": est["reason"], "rounds": est["rounds"], "load_before": load_before,
            "load_after": os.getloadavg()[0], "wall_s": round(wall, 1), "exit_code": proc.returncode,
            "contention": (row.get("timing") or {}).get("contention")}


def foreign(row: dict) -> str:
    c = row.get("contention") or {}
    return f"other processes {c['foreign_cores']:.2f} cores" if c.get("available") else "contention not measured"


def overlaps(a: dict, b: dict) -> bool:
    return a["low"] <= b["high"] and b["low"] <= a["high"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--backend", default="deepsparse")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes beside the loaded repeats")
    ap.add_argument("--runs", type=int, default=20, help="verify --runs (paired rounds start from this)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "verify_noise.json")
    args = ap.parse_args(argv)
    if not (args.artifact / "manifest.json").is_file():
        print(f"error: {args.artifact} is not a sparsec artifact (no manifest.json)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from runtimes.measure.machine import record_machine

    machine = record_machine(threads=args.threads)
    calm, loaded = [], []
    for i in range(args.repeats):
        calm.append(verify_once(args.artifact, args.backend, args.runs, args.threads))
        print(f"as is  {i + 1}: {calm[-1]['median']:.2f}x [{calm[-1]['low']:.2f}, {calm[-1]['high']:.2f}] "
              f"{calm[-1]['verdict']} (load {calm[-1]['load_before']:.1f}, {foreign(calm[-1])})", flush=True)
    for i in range(args.repeats):
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
        try:
            time.sleep(2)
            loaded.append(verify_once(args.artifact, args.backend, args.runs, args.threads))
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        print(f"hogged {i + 1}: {loaded[-1]['median']:.2f}x [{loaded[-1]['low']:.2f}, {loaded[-1]['high']:.2f}] "
              f"{loaded[-1]['verdict']} (load {loaded[-1]['load_before']:.1f}, {foreign(loaded[-1])})", flush=True)
    import numpy as np

    calm_median = float(np.median([r["median"] for r in calm]))
    calm_agree = all(overlaps(a, b) for i, a in enumerate(calm) for b in calm[i + 1:])
    loaded_honest = [r["verdict"] == "inconclusive" or r["low"] <= calm_median <= r["high"] for r in loaded]
    summary = {"calm_median": calm_median, "calm_intervals_overlap": calm_agree,
               "loaded_inconclusive_or_containing_calm": loaded_honest, "all_loaded_honest": all(loaded_honest)}
    print(json.dumps(summary))
    args.out.write_text(json.dumps({"machine": machine.finish().to_dict(), "backend": args.backend,
                                    "artifact": repo_relative(args.artifact), "calm": calm, "loaded": loaded,
                                    "hogs": args.hogs, "summary": summary,
                                    "command": "python benchmarks/verify_noise.py " + " ".join(argv or sys.argv[1:])},
                                   indent=1) + "\n")
    print(f"wrote {repo_relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
