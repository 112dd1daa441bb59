"""The daemon's outputs: sidecars, reject records, what ComfyUI could see, and a fresh reference run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from service.publish import TEMP_DIR
from service.rules import Rule
from service.runner import Job, Outcome, process_job
from tests.e2e.conftest import frames

MAX_BYTES = 256 * 1024 * 1024  # the daemon's defaults, for in-process jobs
MAX_PIXELS = 100_000_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecars(queue: Path, *, per_image: bool = False) -> dict[Any, dict[str, Any]]:
    """Every sidecar of the queue by the source key it names; `per_image`: by (key, source sha256), for a
    path one image followed another at (whose frame stays, see `service.runner.Job.gone`). Never two of one."""
    found: dict[Any, dict[str, Any]] = {}
    matrix = queue / "matrix"
    for path in sorted(matrix.glob("*.json")) if matrix.is_dir() else []:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
        key = (sidecar["source"]["key"], sidecar["source"]["sha256"]) if per_image else sidecar["source"]["key"]
        assert key not in found, f"two sidecars name the source {key!r}: {path.name}"
        found[key] = sidecar
    return found


def rejects(queue: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    folder = queue / "rejected"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text(encoding="utf-8"))
        found[record["key"]] = record
    return found


def decodes_completely(path: Path) -> bool:
    """A PNG that Pillow (ComfyUI's reader) loads to the last row, with a valid IEND."""
    try:
        with Image.open(path) as im:
            im.load()
        with Image.open(path) as im:
            im.verify()
    except Exception:
        return False
    return True


def check_published_set(
    queue: Path, *, checked: dict[str, tuple[int, int, int]] | None = None, per_image: bool = False
) -> dict[Any, dict[str, Any]]:
    """What ComfyUI could see right now is consistent: only frames at the top, each with its set.

    Returns the sidecars by source key (`per_image`: see `sidecars`). Fails on any visible file that is not a
    finished frame, a frame without heatmap or sidecar, a frame whose bytes are
    not the ones its sidecar names, or one that does not decode completely.
    `checked` (name -> inode, size, mtime) spares decoding a frame again that
    has not changed since an earlier call.
    """
    by_key = sidecars(queue, per_image=per_image)
    by_frame = {sidecar["output"]["frame"]: sidecar for sidecar in by_key.values()}
    for path in frames(queue) if queue.exists() else []:
        assert path.suffix == ".png" and not path.name.startswith("."), f"not a frame at the top: {path.name!r}"
        sidecar = by_frame.get(path.name)
        assert sidecar is not None, f"frame {path.name!r} has no sidecar (published before it)"
        assert (queue / sidecar["output"]["heatmap"]).is_file(), f"frame {path.name!r} has no heatmap"
        assert sha256(path.read_bytes()) == sidecar["output"]["frame_sha256"], f"frame {path.name!r} is not its own"
        st = path.stat()
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if checked is None or checked.get(path.name) != identity:
            assert decodes_completely(path), f"frame {path.name!r} does not decode completely"
            if checked is not None:
                checked[path.name] = identity
    return by_key


def temp_files(queue: Path) -> list[str]:
    folder = queue / TEMP_DIR
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def reference_run(source: Path, *, key: str, name: str, rule: Rule, queue: Path) -> Outcome:
    """A fresh in-process run of the single runner for one source, into another queue."""
    job = Job(source=source, key=key, name=name, rule=rule, queue=queue, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    return process_job(job)


def without_timings(sidecar: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in sidecar.items() if key != "timings_ms"}


def assert_same_outputs(queue: Path, reference: Path, name: str) -> None:
    """Frame and heatmap bytes and the sidecar (less its timings) equal the reference run's."""
    for relative in (f"{name}.png", f"matrix/{name}.matrix.png"):
        assert (queue / relative).read_bytes() == (reference / relative).read_bytes(), f"{relative} differs"
    ours = json.loads((queue / "matrix" / f"{name}.json").read_text(encoding="utf-8"))
    theirs = json.loads((reference / "matrix" / f"{name}.json").read_text(encoding="utf-8"))
    assert without_timings(ours) == without_timings(theirs), f"sidecar of {name!r} differs from a fresh run"
