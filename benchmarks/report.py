"""The report: targets checked against one run's numbers, and the tables printed from them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value, its limit and whether it is met (ratios of one run only).

    Judged on the unrounded values: a ratio of 1.796 does not meet ">= 1.8". A target whose part of the
    run is missing stays in the list as not measured.
    """
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, *, at_least: bool = False) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        out.append({"target": name, "value": value, "limit": f"{'>=' if at_least else '<='} {limit:g}", "met": met})

    # Issue 3 names the first two generator sizes (1024x1024 and 832x1216 in a full run) for "between";
    # issue 7's pipeline / floor holds per image, so every source group.
    issue3 = [f"PNG {width}x{height}" for width, height in report["config"]["sizes"][:2]]
    for key in ("single", "single_plain"):
        for group, summary in report.get(key, {}).items():
            codecs = codec_label(report, key)
            add(f"pipeline / floor, {group}, {codecs}", summary["pipeline_over_floor"], 1.15)
            if group in issue3:
                add(f"between / (decode+encode), {group}, {codecs}", summary["between_over_codec"], 0.15)
    if "peers" in report:
        rows = list(report["peers"].values())
        for ours in ("sinkwatch", "sinkwatch_plain"):
            if not all(ours in row for row in rows):
                continue
            for peer, limit in (("imagemagick", 8.0), ("pillow", 3.0)):
                ratios = [row[peer] / row[ours] for row in rows if peer in row]
                name = f"{peer} / sinkwatch per image, {codec_label(report, ours)}"
                if ratios:
                    add(f"{name} (median of {len(ratios)})", statistics.median(ratios), limit, at_least=True)
                else:
                    add(f"{name} (not measured: {peer} not installed)", None, limit, at_least=True)
    d = report.get("daemon")
    if d:
        ratios = burst_ratios(d["bursts"])
        name = f"throughput 2 workers / 1 worker (median of {len(ratios)} rounds)"
        add(name, statistics.median(ratios), 1.8, at_least=True)
        latency = latency_of(d["bursts"])
        if latency:
            # The denominator is measured in the same phase as the latency, on the same images: a single-image
            # time from an earlier phase would carry that phase's load into the ratio.
            name = "latency p50 / pipeline time of the same images (the workers' decode..encode)"
            add(name, latency["p50_ms"] / latency["worker_p50_ms"], 1.3)
        backlog = d["backlog"]
        span = f"image {backlog['from_image']} to {backlog['images']}"
        for key, label in (("rss_kb", "RSS"), ("fds", "open fds")):
            for role, whose in (("daemon", "the daemon's process"), ("worker", "its workers")):
                add(f"{label} growth of {whose}, {span}", backlog[key][role]["growth"], 0.10)
    return out


def burst_ratios(bursts: Sequence[dict[str, Any]]) -> list[float]:
    """Throughput with 2 workers over 1 worker, per round (each pair ran back to back)."""
    rate = {(b["round"], b["workers"]): b["images_per_second"] for b in bursts}
    rounds = sorted({b["round"] for b in bursts})
    return [rate[r, 2] / rate[r, 1] for r in rounds]


def latency_of(bursts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The latency measurement, taken after the first burst with 2 workers."""
    return next((b["latency"] for b in bursts if "latency" in b), None)


def codec_label(report: dict[str, Any], key: str) -> str:
    """Which PNG codecs the numbers under `key` are for ("single_plain", "sinkwatch_plain": a plain install's)."""
    codecs = report.get("png_codecs", {})
    if key.endswith("_plain") or codecs.get("encode", "zlib") == "zlib":
        return "plain codecs (OpenCV decode + zlib encode)"
    return f"fast codecs ({codecs['encode']} + {codecs['decode']})"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"sinkwatch benchmarks ({report.get('mode', 'custom')} run, {report.get('seconds', '?')} s)",
        f"machine: {m['cores']} cores, {m['cpu']}; Python {m['python']}, numpy {m['numpy']}, OpenCV {m['opencv']}, "
        f"Pillow {m['pillow']}, pyspng {m['pyspng']}, fpng {m['fpng']}",
        f"ImageMagick: {m['imagemagick']}; OPENBLAS_CORETYPE={m['OPENBLAS_CORETYPE'] or 'unset'}; "
        f"load average {m['load_average']} at start, {m.get('load_average_end')} at end",
    ]
    for key in ("single", "single_plain"):
        if key in report:
            lines += ["", *_single(report[key], codec_label(report, key))]
    if "peers" in report:
        lines += ["", *_peers(report["peers"])]
    if "codecs" in report:
        lines += ["", *_codecs(report["codecs"])]
    if "daemon" in report:
        lines += ["", *_daemon(report["daemon"])]
    steps = report.get("step_seconds", {})
    if steps:
        rows = [[name, lap["seconds"], lap["machine_busy_cores"]] for name, lap in steps.items()]
        lines += ["", "Steps: wall seconds, and cores the whole machine kept busy meanwhile (this run and others)"]
        lines += table(["step", "seconds", "machine busy cores"], rows)
    verdicts = {True: "met", False: "NOT MET", None: "-"}
    # Four digits: the verdict is taken on the unrounded value, and 1.796 must not read as 1.8 beside ">= 1.8".
    rows = [
        [t["target"], "-" if t["value"] is None else f"{t['value']:.4g}", t["limit"], verdicts[t["met"]]]
        for t in report["targets"]
    ]
    lines += ["", "Targets", *table(["target", "measured", "limit", ""], rows)]
    return "\n".join(lines)


def _single(single: dict[str, Any], codecs: str) -> list[str]:
    stage_heads = ["decode", "resize", "analysis", "mask+blur", "heatmap", "scores", "encode", "publish"]
    keys = ["decode", "resize", "analysis", "mask_blur", "heatmap", "scores", "encode", "publish"]
    rows = []
    for group, s in single.items():
        st = s["stages_ms"]
        rows.append([group, s["images"], s["source_mb"], *(st[k] for k in keys), s["pipeline_ms"], s["job_ms"]])
    out = [f"Single image, one thread, {codecs}: median ms per image (runner timings; pipeline = decode..encode)"]
    out += table(["source", "n", "MB", *stage_heads, "pipeline", "job"], rows)
    rows = [
        [
            group,
            s["floor_stages_ms"]["decode"],
            s["floor_stages_ms"]["resize"],
            s["floor_stages_ms"]["encode"],
            s["floor_ms"],
            s["pipeline_over_floor"],
            s["between_over_codec"],
            s["resize_to_heatmap_over_codec"],
            s["resize_over_codec"],
        ]
        for group, s in single.items()
    ]
    out += ["", "Floor (decode + resize + encode of the two outputs, same functions) and ratios"]
    out += table(
        [
            "source",
            "decode",
            "resize",
            "encode",
            "floor",
            "pipeline/floor",
            "between/codec",
            "resize..heatmap/codec",
            "resize/codec",
        ],
        rows,
    )
    calls = list(next(iter(single.values()))["core_calls_ms"])
    rows = [[group, *(s["core_calls_ms"][c] for c in calls)] for group, s in single.items()]
    out += ["", "Inside core.pipeline.run: median ms per call"]
    out += table(["source", *calls], rows)
    return out


def _peers(rows_by_source: dict[str, Any]) -> list[str]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in rows_by_source.values():
        groups.setdefault(result["group"], []).append(result)
    rows = []
    for group, items in groups.items():
        sw = statistics.median(r["sinkwatch"] for r in items)
        first = round(1000 * statistics.median(r["sinkwatch_first"] for r in items), 1)
        row: list[Any] = [group, len(items), round(1000 * sw, 1), first]
        if all("sinkwatch_plain" in r for r in items):
            row += [round(1000 * statistics.median(r["sinkwatch_plain"] for r in items), 1)]
        else:
            row += ["n/a"]
        for peer in ("pillow", "imagemagick"):
            have = [r for r in items if peer in r]
            if have:
                row += [round(1000 * statistics.median(r[peer] for r in have), 1)]
                row += [round(statistics.median(r[peer] / r["sinkwatch"] for r in have), 1)]
            else:
                row += ["n/a", "n/a"]
        rows.append(row)
    out = [
        "Peers: the same job per image, each way a few times in a row (ms; x = peer time / sinkwatch time with the",
        "codecs in use, median per image; 'first': sinkwatch's first job after the peers, not in its median, see",
        "benchmarks/peers.py; 'plain codecs': sinkwatch as a plain install without the `fast` extra)",
    ]
    heads = ["source", "n", "sinkwatch job", "first", "plain codecs", "Pillow", "x", "ImageMagick", "x"]
    return out + table(heads, rows)


def _codecs(c: dict[str, Any]) -> list[str]:
    out = ["Codec alternatives, PNG at the first generator size (median ms per image; encode = frame + heatmap)"]
    out += table(["codec", "ms"], [[name, ms] for name, ms in c["png_ms"].items()])
    out += [f"checks: {c['checks']}"]
    rows = [[group, v["full"], v["reduced"]] for group, v in c["jpeg"].items()]
    out += ["", "JPEG decode + resize (ms): full decode vs reduced-scale decode (reduce_to as the runner passes it)"]
    return out + table(["source", "full", "reduced"], rows)


def _daemon(d: dict[str, Any]) -> list[str]:
    ratios = burst_ratios(d["bursts"])
    rows = [
        [
            b["round"],
            b["workers"],
            b["images"],
            b["seconds"],
            b["images_per_second"],
            b["cores_used"],
            b["images_per_cpu_second"],
            b["daemon_main_cores"],
            b["machine_busy_cores"],
            b["idle_daemon_cpu_percent"],
        ]
        for b in d["bursts"]
    ]
    out = [
        "Daemon (subprocess, real folders): burst throughput. Cores = CPU seconds / wall seconds: used by",
        "daemon + workers, by its main process alone, by the whole machine (others included); idle = main process",
        f"CPU % while nothing is to do. 2 workers / 1 worker by round: {_ratios(ratios)}",
    ]
    heads = [
        "round",
        "workers",
        "images",
        "seconds",
        "images/s",
        "cores used",
        "images/CPU s",
        "main",
        "machine",
        "idle CPU %",
    ]
    out += table(heads, rows)
    out += [
        "",
        "The same bursts without the daemon: process_job in a pool of 1 and 2 workers set up as the daemon's, the",
        f"machine's ceiling for the daemon's scaling. 2 workers / 1 by round: {_ratios(burst_ratios(d['bare']))}",
    ]
    rows = [
        [b["round"], b["workers"], b["images"], b["seconds"], b["images_per_second"], b["cores_used"]]
        for b in d["bare"]
    ]
    out += table(["round", "workers", "images", "seconds", "images/s", "cores used"], rows)
    lat = latency_of(d["bursts"])
    if lat:
        where = f"{d['latency_source']} at {lat['rate_per_second']}/s, 2 workers"
        out += ["", f"Latency, file close -> frame published, {where}"]
        out += table(
            ["images", "p50 ms", "p99 ms", "max ms", "daemon's mean ms", "worker p50 ms (decode..encode)"],
            [[lat["images"], lat["p50_ms"], lat["p99_ms"], lat["max_ms"], lat["daemon_mean_ms"], lat["worker_p50_ms"]]],
        )
    b = d["backlog"]
    rows = [
        [f"{label}, {whose}", *(b[key][role][k] for k in ("early_peak", "late_peak", "peak")), b[key][role]["growth"]]
        for key, label in (("rss_kb", "RSS kB"), ("fds", "open fds"))
        for role, whose in (("daemon", "daemon"), ("worker", "workers"))
    ]
    window = b["window"]
    out += ["", f"Backlog of {b['images']} images, 2 workers ({b['images_per_second']} images/s): peaks"]
    heads = ["", f"images {b['from_image']}-{b['from_image'] + window}", f"last {window}", "whole run", "growth"]
    return out + table(heads, rows)


def _ratios(ratios: Sequence[float]) -> str:
    return ", ".join(f"{r:.3f}" for r in ratios)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Plain text columns: the first left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers], *[[_num(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
