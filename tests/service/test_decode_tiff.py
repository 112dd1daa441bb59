"""service.decode on TIFF: tiles a decoder would have to allocate in full are refused before any pixel is
decoded, and the tiled and striped files writers produce decode."""

from __future__ import annotations

import functools
import io
import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import ImageFile, TiffImagePlugin

from service.decode import decode_bytes
from service.errors import ImageTooLarge
from tests.conftest import load_photo

REPO = Path(__file__).resolve().parents[2]
BIG = 10**8


def decode(data: bytes, *, max_pixels: int = BIG) -> np.ndarray:
    return decode_bytes(data, path="watch/source.tif", max_pixels=max_pixels).rgb


@functools.cache
def crop(height: int, width: int) -> np.ndarray:
    return np.ascontiguousarray(load_photo("astronaut")[120 : 120 + height, 160 : 160 + width])


def written(rgb: np.ndarray, **options: Any) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, rgb, photometric="rgb", **options)
    return out.getvalue()


def claiming_tiles(side: int) -> bytes:
    """The reviewer's file: 64x64 RGB, one deflate tile claiming side x side pixels, ~150 bytes.

    Hand-made: writing a real 24576-pixel tile would mean compressing 1.8 GB.
    """
    payload = zlib.compress(b"\x80" * (64 * 64 * 3))
    tags = [(256, 4, 1, 64), (257, 4, 1, 64), (258, 3, 3, 0), (259, 3, 1, 8), (262, 3, 1, 2), (277, 3, 1, 3)]
    tags += [(284, 3, 1, 1), (322, 4, 1, side), (323, 4, 1, side), (324, 4, 1, 0), (325, 4, 1, len(payload))]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, kind, count, value in tags:
        value = {258: bits_at, 324: bits_at + 6}.get(tag, value)  # BitsPerSample and the tile: after the IFD
        if kind == 3 and count == 1:
            out += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, count, value)
    return out + struct.pack("<IHHH", 0, 8, 8, 8) + payload


def rows_per_strip(data: bytes, rows: int) -> bytes:
    """`data` (tifffile's, RowsPerStrip stored as a LONG) with RowsPerStrip set to `rows`."""
    at = tifffile.TiffFile(io.BytesIO(data)).pages.first.tags[278].valueoffset
    return data[:at] + struct.pack("<I", rows) + data[at + 4 :]


def test_hand_made_tiff_matches_what_it_claims() -> None:
    with TiffImagePlugin.TiffImageFile(io.BytesIO(claiming_tiles(64))) as im:
        assert im.size == (64, 64) and im.tag_v2[322] == im.tag_v2[323] == 64
    assert np.all(decode(claiming_tiles(64)) == 0x80)


def real_file_with_huge_tiles() -> bytes:
    return written(crop(64, 64), tile=(2048, 2048), compression="zlib")


@pytest.mark.parametrize(
    ("make", "max_pixels"),
    [
        pytest.param(functools.partial(claiming_tiles, 24576), BIG, id="over-max-pixels"),  # libtiff took 1.8 GB
        pytest.param(functools.partial(claiming_tiles, 4096), BIG, id="far-longer-than-the-image"),
        pytest.param(functools.partial(claiming_tiles, 1024), 10**6, id="within-the-slack-over-max-pixels"),
        pytest.param(real_file_with_huge_tiles, BIG, id="tifffile-2048-tiles-on-64x64"),
    ],
)
def test_tile_bombs_are_refused_before_any_pixel_is_decoded(
    make: Callable[[], bytes], max_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make()
    loads: list[str] = []
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", lambda self: loads.append("TIFF load"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append("load"))
    with pytest.raises(ImageTooLarge, match="TIFF tiles of") as raised:
        decode(data, max_pixels=max_pixels)
    assert raised.value.reason == "bomb" and raised.value.path == "watch/source.tif" and loads == []


CHILD = """
import json, resource, sys
from pathlib import Path
from service.decode import decode_file
from service.errors import InputError
def peak():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) << 10
used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
results = {}
for path in sorted(Path(sys.argv[1]).iterdir()):
    before = peak()
    try:
        image = decode_file(path, max_bytes=1 << 28, max_pixels=10**8)
        outcome = [list(image.rgb.shape), image.rgb.tobytes().hex()]
    except InputError as exc:
        outcome = [type(exc).__name__, exc.reason]
    results[path.name] = [outcome, peak() - before]
print(json.dumps(results))
"""


def test_in_a_memory_limited_child_tile_bombs_are_refused_and_striped_files_decode(tmp_path: Path) -> None:
    """1 GiB of address space over what the child uses; each decode may raise the peak RSS by < 32 MiB."""
    rgb = crop(64, 64)
    files = {
        "tile-24576.tif": claiming_tiles(24576),
        "tile-2048-real.tif": real_file_with_huge_tiles(),
        # Measured: libtiff clamps RowsPerStrip to the image height, so a huge one costs nothing.
        "rows-per-strip-10M.tif": rows_per_strip(written(rgb, compression="zlib"), 10**7),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    results = json.loads(out.strip().splitlines()[-1])
    assert results["tile-24576.tif"][0] == ["ImageTooLarge", "bomb"]
    assert results["tile-2048-real.tif"][0] == ["ImageTooLarge", "bomb"]
    assert results["rows-per-strip-10M.tif"][0] == [[64, 64, 3], rgb.tobytes().hex()]
    assert all(growth < 32 << 20 for _, growth in results.values()), results


@pytest.mark.parametrize(
    ("height", "width", "tile"),
    [
        (100, 150, (256, 256)),  # libtiff's and GDAL's default tile on a smaller image
        (64, 64, (1024, 1024)),  # the largest tile allowed beyond the image
        (300, 400, (64, 128)),
        (301, 399, (304, 400)),  # the image rounded up to 16
    ],
)
def test_tiled_files_writers_produce_decode(height: int, width: int, tile: tuple[int, int]) -> None:
    rgb = crop(height, width)
    assert np.array_equal(decode(written(rgb, tile=tile, compression="zlib")), rgb)
    assert np.array_equal(decode(written(rgb, tile=tile)), rgb)


@pytest.mark.parametrize("rows", [1, 7, 64, 10**7])
def test_striped_files_decode_whatever_their_rows_per_strip(rows: int) -> None:
    rgb = crop(64, 96)
    data = rows_per_strip(written(rgb, compression="zlib", rowsperstrip=min(rows, 64)), rows)
    assert np.array_equal(decode(data), rgb)
