"""The same job done the ways a user might do it without sinkwatch.

Both peers produce what sinkwatch publishes, at the size it publishes: a
cleaned frame (resized with ``cover``, a blurred copy blended in through a
soft mask of high-frequency detail) and a Matrix Vision heatmap, as PNG files.

- ImageMagick: one ``convert`` command per image, as a shell loop would run
  it; high-pass by blur difference, local mean, fixed scale, threshold mask,
  soft edge, composite. The fast ``-blur`` (separable Gaussian) everywhere,
  and ImageMagick's own thread count, as a shell user gets it: every core on
  each image, where sinkwatch's job uses one (on 2 cores, 581 against 687 ms
  at one thread, measured).
- Pillow: a short script at Pillow's defaults (``ImageOps.fit``,
  ``ImageFilter.GaussianBlur``, ``ImageChops.difference``, ``point``,
  ``Image.composite``, ``save``), in-process, so it pays no start-up per image.

Each way does an image a few times in a row, as it would go through a folder,
and the first time is not in its median (it is kept, as ``sinkwatch_first``
for sinkwatch). On the shared virtual machines this runs on, memory a process
left alone for a fraction of a second is slow to touch again: one
``cv2.GaussianBlur`` of a 1024x1024 frame takes 32 ms back to back, 44 to 53 ms
after a 250 ms pause, sleeping or busy elsewhere. That falls on what reuses its
memory (sinkwatch's worker, 1.3x to 1.6x slower on the first image after a
peer) and not on what maps it afresh (a ``convert`` process, Pillow's new
images): ways taken in turn image by image, as before, measured the pause.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageFilter, ImageOps

from benchmarks.corpus import Source
from benchmarks.machine import imagemagick_version
from benchmarks.single import fast_codecs, job_seconds
from core.resize import ResizeParams, target_size
from service.rules import Rule

# Shared by both peers, in output pixels and grey levels, close to sinkwatch's default rule.
SIGMA = 1.2  # high-pass and blur sigma
WINDOW_RADIUS = 4  # local energy window (9 px)
GAIN = 10  # energy scale: a mean detail of 25.5 grey levels is full white
THRESHOLD = 128  # mask where the scaled energy is at least half scale
FEATHER = 3  # soft mask edge (Gaussian sigma)


def output_size(source: Source, params: ResizeParams) -> tuple[int, int]:
    """The (w, h) sinkwatch publishes for `source`: the peers make the same."""
    return target_size(*source.size, params)


def magick_command(convert: str, source: Path, frame: Path, heatmap: Path, size: tuple[int, int]) -> list[str]:
    geometry = f"{size[0]}x{size[1]}"
    return [
        convert, str(source),
        "-resize", f"{geometry}^", "-gravity", "center", "-extent", geometry, "+repage",
        "-write", "mpr:frame", "+delete",
        # Matrix Vision: |Y - G(Y)|, its local mean, on a fixed scale.
        "mpr:frame", "-colorspace", "Gray", "(", "+clone", "-blur", f"0x{SIGMA}", ")",
        "-compose", "Difference", "-composite",
        "-blur", f"0x{WINDOW_RADIUS}", "-level", f"0,{100 / GAIN:g}%",
        "-write", str(heatmap), "-write", "mpr:energy", "+delete",
        # Cleaned frame: a blurred copy composited through the soft threshold mask.
        "mpr:frame", "(", "mpr:frame", "-blur", f"0x{SIGMA}", ")",
        "(", "mpr:energy", "-threshold", f"{100 * THRESHOLD / 255:.1f}%", "-blur", f"0x{FEATHER}", ")",
        "-compose", "Over", "-composite", str(frame),
    ]  # fmt: skip


def magick_job(convert: str, source: Path, frame: Path, heatmap: Path, size: tuple[int, int]) -> None:
    subprocess.run(magick_command(convert, source, frame, heatmap, size), check=True, capture_output=True)


def pillow_job(source: Path, frame: Path, heatmap: Path, size: tuple[int, int]) -> None:
    with Image.open(source) as image:
        rgb = ImageOps.fit(image.convert("RGB"), size)
    grey = rgb.convert("L")
    detail = ImageChops.difference(grey, grey.filter(ImageFilter.GaussianBlur(SIGMA)))
    energy = detail.filter(ImageFilter.BoxBlur(WINDOW_RADIUS)).point(lambda v: min(255, v * GAIN))
    energy.save(heatmap)
    mask = energy.point(lambda v: 255 if v >= THRESHOLD else 0).filter(ImageFilter.GaussianBlur(FEATHER))
    Image.composite(rgb.filter(ImageFilter.GaussianBlur(SIGMA)), rgb, mask).save(frame)


def measure(
    sources: Sequence[Source],
    *,
    rule: Rule,
    folder: Path,
    reps: int,
) -> dict[str, dict[str, Any]]:
    """Per source: median seconds of sinkwatch (one `process_job`; with the `fast` extra installed, also
    as a plain install with its codecs: "sinkwatch_plain") and of each peer, each ``reps`` times in a
    row after one more (see the module's doc), the ways in turn source by source so that the load of a
    shared machine falls on all alike; and what each peer wrote (checked)."""
    folder.mkdir(parents=True, exist_ok=True)
    params = rule.to_params().resize
    convert = shutil.which("convert") if imagemagick_version() else None
    peers = ("pillow", "imagemagick") if convert else ("pillow",)
    results: dict[str, dict[str, Any]] = {}
    for source in sources:
        size = output_size(source, params)
        ours = ("sinkwatch", "sinkwatch_plain") if fast_codecs() else ("sinkwatch",)
        times: dict[str, list[float]] = {}
        for name in ours:
            plain = name == "sinkwatch_plain"
            times[name] = [
                job_seconds(
                    source, rule=rule, queue=folder / "queue", tag=f"peer{rep}{'-plain' if plain else ''}", plain=plain
                )
                for rep in range(reps + 1)
            ]
        for peer in peers:
            frame, heatmap = _outputs(folder, source, peer)
            times[peer] = []
            for _rep in range(reps + 1):
                started = time.perf_counter()
                if peer == "pillow":
                    pillow_job(source.path, frame, heatmap, size)
                else:
                    magick_job(str(convert), source.path, frame, heatmap, size)
                times[peer].append(time.perf_counter() - started)
        row: dict[str, Any] = {"group": source.group, "size": list(size), "sinkwatch_first": times["sinkwatch"][0]}
        row |= {name: statistics.median(values[1:]) for name, values in times.items()}
        row |= {f"{peer}_outputs": _checked_outputs(*_outputs(folder, source, peer), size) for peer in peers}
        results[source.path.name] = row
    return results


def _outputs(folder: Path, source: Source, peer: str) -> tuple[Path, Path]:
    return folder / f"{source.path.stem}.{peer}.png", folder / f"{source.path.stem}.{peer}.matrix.png"


def _checked_outputs(frame: Path, heatmap: Path, size: tuple[int, int]) -> dict[str, Any]:
    """Proof that a peer did the job: both images exist, decode, and have the published size."""
    found = {}
    for kind, path in (("frame", frame), ("heatmap", heatmap)):
        with Image.open(path) as image:
            image.load()
            if image.size != size:
                raise RuntimeError(f"{path.name} is {image.size}, not {size}")
            found[kind] = {"mode": image.mode, "bytes": path.stat().st_size}
    return found
