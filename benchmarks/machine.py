"""What the numbers were measured on, and the small statistics every section shares."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from importlib import metadata


def describe() -> dict[str, object]:
    """Cores, CPU model, load and library versions: the header of every report."""
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "opencv": _version("opencv-python-headless"),
        "pillow": _version("pillow"),
        "pyspng": _version("pyspng"),
        "fpng": _version("fpng"),
        "imagemagick": imagemagick_version(),
        # Set on some processors to work around old OpenBLAS bugs; numpy matters little here.
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def imagemagick_version() -> str | None:
    """The version line of the real ImageMagick ``convert``, or None when it is not installed.

    Some machines have a ``convert`` that is not ImageMagick; only the real one counts.
    """
    convert = shutil.which("convert")
    if convert is None:
        return None
    try:
        out = subprocess.run([convert, "-version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError:
        return None
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("Version: ").strip() if "ImageMagick" in first else None


def median_ms(seconds: Sequence[float]) -> float:
    return round(1000 * statistics.median(seconds), 2) if seconds else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation, like numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
