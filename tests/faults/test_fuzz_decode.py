"""Hostile input: mutated real PNG, JPEG and WebP bytes, and hand-made headers.

Promise under test: whatever bytes land in the watch folder, decoding raises
only the four documented errors (IncompleteImage, CorruptImage,
UnsupportedImage, ImageTooLarge), the runner only returns an Outcome, the
process never dies and its memory stays bounded (tracemalloc peak in
process; RLIMIT_AS and the peak RSS of a child process for the bombs), and a
running daemon fed a batch of them stays healthy and ends each as a frame or
a reject record. Hypothesis runs derandomized, without a database, so CI sees
the same examples every time.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from service.decode import DecodedImage, decode_bytes
from service.errors import REJECT_REASONS, CorruptImage, ImageTooLarge, IncompleteImage, UnsupportedImage
from service.rules import load_rules
from service.runner import Outcome
from tests.conftest import load_photo, wait_for
from tests.e2e.conftest import REPO, DaemonProcess
from tests.faults.outputs import MAX_PIXELS, check_published_set, reference_run, rejects, sidecars, temp_files
from tests.faults.presets import copy_presets
from tests.faults.readings import health

DOCUMENTED = (IncompleteImage, CorruptImage, UnsupportedImage, ImageTooLarge)
FUZZ_MAX_PIXELS = 4_000_000  # small, so a mutated header that passes the guard still cannot cost much
TRACED_PEAK_BOUND = 128 << 20  # bytes, per decode, Python + numpy allocations (tracemalloc)
CHILD_RSS_BOUND = 700 << 20  # bytes, peak RSS of a child that decodes and processes every bomb
CHILD_ADDRESS_LIMIT = 3 << 30  # RLIMIT_AS of that child: an unbounded allocation fails there, loudly
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- seeds: real photographs in every format the fuzzer mutates -----------------------------------


@cache
def seeds() -> dict[str, bytes]:
    rgb = np.ascontiguousarray(load_photo("chelsea")[60:124, 120:184])
    rgba = np.dstack([rgb, np.linspace(0, 255, 64 * 64, dtype=np.uint8).reshape(64, 64)])
    text = PngImagePlugin.PngInfo()
    text.add_text("prompt", '{"3": {"class_type": "KSampler"}}', zip=True)
    text.add_itxt("workflow", "{}", zip=False)
    out: dict[str, bytes] = {}
    for name, image, fmt, options in (
        ("png", rgb, "PNG", {}),
        ("png-text", rgb, "PNG", {"pnginfo": text}),
        ("png-rgba", rgba, "PNG", {}),
        ("jpeg", rgb, "JPEG", {"quality": 85}),
        ("jpeg-progressive", rgb, "JPEG", {"quality": 85, "progressive": True}),
        ("webp-lossy", rgb, "WEBP", {"quality": 70}),
        ("webp-lossless", rgba, "WEBP", {"lossless": True}),
    ):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt, **options)
        out[name] = buffer.getvalue()
    return out


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed with 1-6 mutations: bit flips, byte sets, inserts, deletes, cuts, duplicated spans."""
    name = draw(st.sampled_from(sorted(seeds())))
    data = bytearray(seeds()[name])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        # Headers are where parsers go wrong: half the mutations land in bytes 8-63 (past the signature,
        # whose damage only ever means "not an image"), the rest anywhere.
        anywhere = draw(st.booleans())
        start, end = (0, len(data)) if anywhere else (min(8, len(data) - 1), min(64, len(data)))
        pos = draw(st.integers(start, end - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "repeat", "length"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "cut":
            del data[pos:]
        elif op == "repeat":
            span = bytes(data[pos : pos + draw(st.integers(1, 256))])
            data[pos:pos] = span * draw(st.integers(1, 4))
        else:  # a 4-byte big or little endian integer: lengths, widths, heights, offsets
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, len(data) * 2]))
            data[pos : pos + 4] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))
    return name, bytes(data)


def _mutation(i: int) -> tuple[str, bytes]:
    """A seeded mutation for the daemon batch (hypothesis drives the in-process tests)."""
    rng = random.Random(f"mutant-{i}")
    name = rng.choice(sorted(seeds()))
    data = bytearray(seeds()[name])
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(min(64, len(data)) if rng.random() < 0.5 else len(data))
        op = rng.choice(("flip", "cut", "insert", "length"))
        if op == "flip":
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "cut":
            del data[max(pos, 16) :]
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 32))
        else:
            data[pos : pos + 4] = rng.choice((0, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)).to_bytes(4, "big")
    return name, bytes(data)


def decode_checked(data: bytes, *, max_pixels: int = FUZZ_MAX_PIXELS) -> str:
    """Decode; the outcome's name ("ok" or the error type), failing on anything undocumented."""
    try:
        image = decode_bytes(data, path="hostile", max_pixels=max_pixels)
    except DOCUMENTED as exc:
        assert exc.reason in REJECT_REASONS, exc.reason
        return type(exc).__name__
    assert isinstance(image, DecodedImage)
    rgb = image.rgb
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.flags.c_contiguous
    assert rgb.shape[0] * rgb.shape[1] <= max_pixels
    return "ok"


# -- hypothesis: decode_bytes and the runner ------------------------------------------------------


def test_mutated_real_images_raise_only_documented_errors(counts: Callable[..., None]) -> None:
    outcomes: Counter[str] = Counter()
    peak = 0

    @settings(FUZZ, max_examples=600)
    @given(mutated())
    def check(case: tuple[str, bytes]) -> None:
        nonlocal peak
        name, data = case
        tracemalloc.start()
        try:
            outcome = decode_checked(data)
            peak = max(peak, tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        outcomes[f"{name}:{outcome}"] += 1
        assert peak < TRACED_PEAK_BOUND

    check()
    by_outcome: Counter[str] = Counter()
    for key, n in outcomes.items():
        by_outcome[key.split(":")[1]] += n
    counts(examples=sum(outcomes.values()), outcomes=dict(by_outcome), traced_peak_mb=round(peak / 2**20, 1))
    assert by_outcome["ok"] > 0 and len(by_outcome) >= 3, "the mutations were too weak to test anything"


def test_mutated_real_images_through_the_runner_give_only_outcomes(tmp_path: Path, counts: Callable[..., None]) -> None:
    rules = load_rules(copy_presets(tmp_path / "rules", size=(64, 64)))
    rule = rules.get("default")
    statuses: Counter[str] = Counter()

    @settings(FUZZ, max_examples=80)
    @given(mutated())
    def check(case: tuple[str, bytes]) -> None:
        name, data = case
        n = sum(statuses.values())
        source = tmp_path / "watch" / f"fuzz_{n:04d}.{name.split('-')[0]}"
        source.parent.mkdir(exist_ok=True)
        source.write_bytes(data)
        outcome = reference_run(source, key=source.name, name=source.stem, rule=rule, queue=tmp_path / "queue")
        assert isinstance(outcome, Outcome)
        assert outcome.status in ("published", "rejected", "retry"), outcome
        if outcome.status == "rejected":
            assert outcome.reason in REJECT_REASONS and outcome.reason != "crashed", outcome.error
        statuses[outcome.status if outcome.status != "rejected" else f"rejected:{outcome.reason}"] += 1

    check()
    counts(examples=sum(statuses.values()), outcomes=dict(statuses))
    check_published_set(tmp_path / "queue")
    assert temp_files(tmp_path / "queue") == []


# -- hand-made headers ----------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes, *, length: int | None = None, crc: int | None = None) -> bytes:
    size = len(body) if length is None else length
    check = zlib.crc32(kind + body) if crc is None else crc
    return size.to_bytes(4, "big") + kind + body + check.to_bytes(4, "big")


def png(width: int, height: int, *, extra: bytes = b"", ihdr_crc: int | None = None, idat: bool = True) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Complete pixel data for small images; headers over the limits must be refused before any is read.
    row = b"\0" + b"\x80" * 3 * min(width, 64)
    rows = zlib.compress(row * height if width * height <= 4096 else row)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr, crc=ihdr_crc)
        + extra
        + (png_chunk(b"IDAT", rows) if idat else b"")
        + png_chunk(b"IEND", b"")
    )


@cache
def bomb_payload() -> bytes:
    """64 MiB of text deflated to about 64 KiB: a zip bomb in a text chunk."""
    return zlib.compress(b"a" * (64 << 20), 9)


def ztxt(keyword: bytes, payload: bytes) -> bytes:
    return png_chunk(b"zTXt", keyword + b"\0\0" + payload)


def itxt(keyword: bytes, payload: bytes) -> bytes:
    return png_chunk(b"iTXt", keyword + b"\0\1\0" + b"\0" + b"\0" + payload)


def real(fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(load_photo("coffee")[100:164, 200:264])).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def jpeg_with_size(width: int, height: int) -> bytes:
    data = real("JPEG", quality=80)
    sof = data.index(b"\xff\xc0")
    return patched(data, sof + 5, struct.pack(">HH", height, width))


def webp_canvas(width: int, height: int) -> bytes:
    inner = real("WEBP", lossless=True)[12:]
    vp8x = b"VP8X" + (10).to_bytes(4, "little") + b"\0\0\0\0" + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + inner
    return b"RIFF" + len(body).to_bytes(4, "little") + body


@cache
def hostile_headers() -> dict[str, tuple[bytes, tuple[type[Exception], ...] | None]]:
    """name -> (bytes, the errors it may raise; None: it must decode)."""
    bomb = bomb_payload()
    tiff = real("TIFF")
    bmp = real("BMP")
    gif = real("GIF")
    return {
        "png-0x0": (png(0, 0), (CorruptImage,)),
        "png-1x0": (png(1, 0), (CorruptImage,)),
        "png-2^31-1-square": (png(2**31 - 1, 2**31 - 1), (ImageTooLarge,)),
        "png-65535-square": (png(65535, 65535), (ImageTooLarge,)),
        "png-one-side-2^20+1": (png(2**20 + 1, 1), (ImageTooLarge,)),
        "png-chunk-length-ffffffff": (PNG_SIGNATURE + png_chunk(b"IHDR", b"\0" * 13, length=0xFFFFFFFF), DOCUMENTED),
        "png-chunk-length-past-end": (png(4, 4)[:8] + png_chunk(b"IHDR", b"\0" * 13, length=5000), (IncompleteImage,)),
        "png-idat-length-2^31-1": (png(4, 4)[:33] + (0x7FFFFFFF).to_bytes(4, "big") + b"IDAT", (IncompleteImage,)),
        "png-ihdr-bad-crc": (png(4, 4, ihdr_crc=0), (CorruptImage,)),
        "png-no-idat": (png(4, 4, idat=False), (CorruptImage,)),
        "png-signature-only": (PNG_SIGNATURE, (IncompleteImage,)),
        "png-ztxt-zip-bomb": (png(4, 4, extra=ztxt(b"prompt", bomb)), None),
        "png-itxt-zip-bomb": (png(4, 4, extra=itxt(b"workflow", bomb)), None),
        "png-many-ztxt-bombs": (png(4, 4, extra=b"".join(ztxt(b"k%d" % i, bomb) for i in range(12))), None),
        "png-many-big-text": (
            png(4, 4, extra=b"".join(ztxt(b"t%d" % i, zlib.compress(b"b" * ((4 << 20) - 1))) for i in range(6))),
            None,
        ),
        "jpeg-65535-square": (jpeg_with_size(65535, 65535), (ImageTooLarge,)),
        "jpeg-0-height": (jpeg_with_size(64, 0), (CorruptImage,)),
        "jpeg-segment-length-1": (b"\xff\xd8\xff\xe0\x00\x01" + real("JPEG")[2:], (CorruptImage,)),
        "jpeg-no-eoi": (real("JPEG")[:-2], (IncompleteImage,)),
        "webp-16384-square-canvas": (webp_canvas(16384, 16384), (ImageTooLarge,)),
        "webp-riff-longer-than-file": (patched(real("WEBP"), 4, (1 << 30).to_bytes(4, "little")), (IncompleteImage,)),
        "webp-riff-shorter-than-chunk": (patched(real("WEBP"), 4, (20).to_bytes(4, "little")), (CorruptImage,)),
        "gif-65535-screen": (patched(gif, 6, b"\xff\xff\xff\xff"), (ImageTooLarge,)),
        "bmp-100000-square": (patched(bmp, 18, struct.pack("<ii", 100000, -100000)), (ImageTooLarge,)),
        "bmp-declared-longer": (patched(bmp, 2, (1 << 30).to_bytes(4, "little")), (IncompleteImage,)),
        "tiff-2^31-square": (
            patched(patched(tiff, 18, struct.pack("<I", 2**31)), 30, struct.pack("<I", 2**31)),
            (ImageTooLarge,),
        ),
        "tiff-ifd-past-end": (patched(tiff, 4, (1 << 20).to_bytes(4, "little")), (IncompleteImage,)),
        "riff-wave": (b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + b"\0" * 28, (UnsupportedImage,)),
        "text-starting-bm": (b"BM is how this text file starts, and nothing more\n" * 4, (UnsupportedImage,)),
        "empty": (b"", (IncompleteImage,)),
    }


@pytest.mark.parametrize("name", sorted(hostile_headers()))
def test_hand_made_hostile_header(name: str) -> None:
    data, expected = hostile_headers()[name]
    tracemalloc.start()
    try:
        try:
            image = decode_bytes(data, path=name, max_pixels=MAX_PIXELS)
        except DOCUMENTED as exc:
            assert expected is not None, f"{name} should decode, raised {exc!r}"
            assert isinstance(exc, expected), f"{name}: {exc!r}, expected one of {expected}"
            if expected == (ImageTooLarge,):
                assert exc.reason == "bomb", exc.reason
        else:
            assert expected is None, f"{name} decoded, expected one of {expected}"
            assert sum(len(v) for v in image.text.values()) <= 8 << 20, "text caps not applied"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < TRACED_PEAK_BOUND, f"{name}: traced peak {peak / 2**20:.0f} MiB"


CHILD = """
import json, resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from service.rules import load_rules
from service.runner import Job, process_job
rule = load_rules(None).get("default")
results = {{}}
for path in sorted(Path(sys.argv[1]).iterdir()):
    job = Job(source=path, key=path.name, name=path.stem, rule=rule, queue=Path(sys.argv[2]),
              max_bytes=256 << 20, max_pixels={max_pixels})
    outcome = process_job(job)
    results[path.name] = [outcome.status, outcome.reason]
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
peak = int(status["VmHWM"].split()[0]) * 1024
print(json.dumps({{"results": results, "peak_rss": peak}}))
"""


@pytest.mark.slow
def test_bombs_in_a_memory_limited_child_process(tmp_path: Path, counts: Callable[..., None]) -> None:
    """Every hostile header through the real runner in a child with RLIMIT_AS: it exits 0, RSS bounded."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name, (data, _expected) in hostile_headers().items():
        (folder / f"{name}.img").write_bytes(data)
    script = CHILD.format(limit=CHILD_ADDRESS_LIMIT, max_pixels=MAX_PIXELS)
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "queue")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    statuses = Counter(f"{status}:{reason}" for status, reason in report["results"].values())
    counts(files=len(report["results"]), outcomes=dict(statuses), child_peak_rss_mb=report["peak_rss"] >> 20)
    assert len(report["results"]) == len(hostile_headers())
    for name, (status, reason) in report["results"].items():
        assert status in ("published", "rejected", "retry"), (name, status)
        assert reason is None or (reason in REJECT_REASONS and reason != "crashed"), (name, reason)
    assert report["peak_rss"] < CHILD_RSS_BOUND


# -- a running daemon fed a batch of them ---------------------------------------------------------


@pytest.mark.slow
def test_hostile_batch_into_a_running_daemon(
    tmp_path: Path, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    watch, queue = tmp_path / "watch", tmp_path / "queue"
    watch.mkdir()
    rules = copy_presets(tmp_path / "rules", size=(128, 128))
    daemon = DaemonProcess(
        watch, queue, tmp_path / "daemon.log", "--rules", str(rules), "--retry-base", "0.1", "--max-attempts", "3"
    )
    daemons.append(daemon)
    daemon.start()
    files: dict[str, bytes] = {}
    suffix = {b"\x89P": "png", b"\xff\xd8": "jpg", b"RI": "webp", b"GI": "png", b"BM": "bmp", b"II": "tif"}
    for name, (data, _expected) in hostile_headers().items():
        files[f"{name}.{suffix.get(data[:2], 'png')}"] = data
    for i in range(24):
        seed_name, data = _mutation(i)
        files[f"mutant_{i:02d}_{seed_name}.{'jpg' if 'jpeg' in seed_name else seed_name.split('-')[0]}"] = data
    for name, data in seeds().items():
        files[f"good_{name}.{'jpg' if 'jpeg' in name else name.split('-')[0]}"] = data
    healthy = 0

    for name, data in files.items():
        (watch / name).write_bytes(data)

    def all_ended() -> bool:
        nonlocal healthy
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
        assert health(daemon) == 200, "hostile input made the daemon unhealthy"
        healthy += 1
        return len(sidecars(queue)) + len(rejects(queue)) == len(files)

    wait_for(all_ended, timeout=120)
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]

    published, rejected = check_published_set(queue), rejects(queue)
    reasons = Counter(str(r["reason"]) for r in rejected.values())
    counts(files=len(files), published=len(published), rejected=len(rejected), reasons=dict(reasons), health=healthy)
    assert set(published).isdisjoint(rejected)
    assert set(published) | set(rejected) == set(files)
    assert all(reason in REJECT_REASONS and reason != "crashed" for reason in reasons), reasons
    assert {f"good_{name}.{'jpg' if 'jpeg' in name else name.split('-')[0]}" for name in seeds()} <= set(published)
