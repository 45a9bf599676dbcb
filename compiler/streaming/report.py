"""The `streaming` section of report.json: why the compile streamed, what it estimated, what it did
(loads, evictions, bytes read and written) and the peak resident set it reached."""

from __future__ import annotations

from typing import Any

from compiler.streaming.memory import GIB, peak_rss
from compiler.streaming.streamed_ir import StreamedIR


def streaming_record(ir: StreamedIR, written: dict[str, Any]) -> dict[str, Any]:
    c = ir.residency.counters
    return {
        **(ir.info or {}),
        "block_loads": c.loads, "evictions": c.evictions, "overlay_writes": c.overlay_writes,
        "gib_read": round(c.bytes_read / GIB, 3), "gib_written_overlay": round(c.bytes_written / GIB, 3),
        "load_seconds": round(c.load_seconds, 3), "overlay_write_seconds": round(c.write_seconds, 3),
        "model_files_gib": round(written["bytes"] / GIB, 3), "model_write_seconds": written["seconds"],
        "shards": written["shards"], "shards_moved_from_overlay": written["moved"],
        "peak_rss_gib": round(peak_rss() / GIB, 3),
    }
