"""Source names that try to break the output names.

Promise under test: every source gets its own frame, heatmap and sidecar
(the sidecar names the right source, and the frame is what a fresh run makes
of *that* source: nothing was overwritten by a name twin), every output name is
safe (one component, no separators or control characters, not hidden, not a
Windows device, at most 120 bytes, unique even on a case-insensitive file
system), hidden files are left alone, and a restart finds nothing to redo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest

from service.ledger import Ledger
from service.naming import DEFAULT_MAX_LENGTH
from service.rules import load_rules
from tests.conftest import wait_for
from tests.e2e.conftest import REPO, DaemonProcess, snapshot
from tests.faults.images import Images
from tests.faults.outputs import (
    assert_same_outputs,
    check_published_set,
    reference_run,
    rejects,
    sha256,
    sidecars,
    temp_files,
)

pytestmark = pytest.mark.slow

# Relative source paths as bytes (some are not UTF-8 at all), grouped by what they attack.
ODD: dict[str, tuple[bytes, ...]] = {
    "unicode forms (NFC, NFD) of one name": ("caf\u00e9.png".encode(), "cafe\u0301.png".encode()),
    "spaces": (b"  two  spaces  .png", b"trailing space .png", b" .png"),
    "the fallback name taken": (b"image.png",),
    "250-byte names sharing 245 bytes": (b"a" * 246 + b".png", b"a" * 245 + b"b.png", "é".encode() * 123 + b".png"),
    "case only": (b"Photo.png", b"photo.png", b"PHOTO.png"),
    "same stem, other extension": (b"x.png", b"x.PNG", b"x.jpg", b"x.webp"),
    "dot runs": (b"a..b.png", b"b...png", b"c. .png"),
    "sanitise to one name": (b"a:b.png", b"a?b.png", b"a_b.png", b"a|b.png", b"a\\b.png", b'a"b.png'),
    "control characters": (b"line\nbreak.png", b"tab\there.png", b"carriage\rreturn.png", b"bell\x07.png"),
    "format characters": ("\u202egnp.exe.png".encode(), "zero\u200bwidth.png".encode(), "bom\ufeff.png".encode()),
    "windows devices": (b"CON.png", b"nul.png", b"com1.png", b"LPT9.tar.png"),
    "not UTF-8": (b"\xff\xfe-latin1-\xe9.png", b"\xe9t\xe9.png"),
    "folder prefix twins": (b"sub/a.png", b"sub__a.png", b"a..b/c.png", b"a.b__c.png"),
}
HIDDEN = (b".hidden.png", b"..png", b"...png", b".dir/x.png")
FORBIDDEN = set('<>:"|?*\\/')
DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{d}{n}" for d in ("COM", "LPT") for n in "0123456789")}


def _fold(name: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def test_odd_names_each_get_their_own_safe_outputs(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    watch, queue, reference = tmp_path / "watch", tmp_path / "queue", tmp_path / "reference"
    watch.mkdir()
    sources: dict[str, bytes] = {}  # key (as the daemon decodes it) -> content
    for i, raw in enumerate(raw for group in ODD.values() for raw in group):
        data = images.make(i, fmt="JPEG" if raw.endswith(b".jpg") else "WEBP" if raw.endswith(b".webp") else "PNG")
        _write(watch, raw, data)
        sources[os.fsdecode(raw)] = data
    for i, raw in enumerate(HIDDEN):
        _write(watch, raw, images.make(500 + i))
    before = snapshot(watch)

    daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", "--recursive")
    daemons.append(daemon)
    daemon.start()
    wait_for(lambda: len(sidecars(queue)) + len(rejects(queue)) >= len(sources), timeout=90)
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]

    by_key = check_published_set(queue)
    assert rejects(queue) == {}
    assert sorted(by_key) == sorted(sources), "a source without outputs, or a hidden file processed"
    stems = {key: Path(sidecar["output"]["frame"]).stem for key, sidecar in by_key.items()}
    for key, stem in stems.items():
        encoded = stem.encode("utf-8")  # a lone surrogate here would be a non-UTF-8 byte leaking through
        assert stem and not stem.startswith(".") and not FORBIDDEN & set(stem), (key, stem)
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in stem), (key, stem)
        assert len(encoded) <= DEFAULT_MAX_LENGTH, (key, stem)
        assert stem.split(".", 1)[0].strip(" ").upper() not in DEVICES, (key, stem)
        assert stem == stem.strip(" ."), (key, stem)
        assert by_key[key]["source"]["sha256"] == sha256(sources[key]), f"{key!r}: the sidecar names another source"
    assert len({_fold(stem) for stem in stems.values()}) == len(stems), "two outputs differ only in case or form"

    # Nothing was overwritten by a name twin: each output is what a fresh run makes of its own source.
    rules = load_rules(None)
    for key, stem in stems.items():
        outcome = reference_run(watch / key, key=key, name=stem, rule=rules.select(key), queue=reference)
        assert outcome.status == "published", outcome
        assert_same_outputs(queue, reference, stem)
    with Ledger(queue / ".sinkwatch" / "state" / "ledger.sqlite3") as ledger:
        entries = {entry.relpath: entry for entry in ledger.entries()}
    assert sorted(entries) == sorted(sources)
    assert all(entries[key].output_name == stem and entries[key].state == "published" for key, stem in stems.items())

    # A restart over the same folders finds nothing to redo and renames nothing.
    outputs = {k: v for k, v in snapshot(queue).items() if not k.startswith(".sinkwatch")}
    command = [sys.executable, "-m", "service", "run", "--once", "--recursive", "--watch", str(watch)]
    once = subprocess.run(
        [*command, "--queue", str(queue), "--metrics-port", "0", "--log-format", "json", "--workers", "2"],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert once.returncode == 0, once.stderr.decode(errors="replace")[-3000:]
    assert {k: v for k, v in snapshot(queue).items() if not k.startswith(".sinkwatch")} == outputs
    assert snapshot(watch) == before, "the watch folder was touched"
    assert temp_files(queue) == []

    groups = {label: len(raws) for label, raws in ODD.items()}
    twins = sum(1 for stem in stems.values() if "-" in stem and len(stem) > 9 and stem[-9] == "-")
    counts(sources=len(sources), hidden_ignored=len(HIDDEN), groups=groups, disambiguated=twins)


def _write(watch: Path, raw: bytes, data: bytes) -> None:
    path = os.path.join(os.fsencode(watch), raw)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
