"""Files dropped into a watch folder the ways generators write them: in chunks, or renamed into place."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """How a careful generator writes: a hidden temp name, then a rename (a `moved` event)."""
    temp = path.with_name(f".{path.name}.partial")
    temp.write_bytes(data)
    os.replace(temp, path)


def write_in_chunks(path: Path, data: bytes, *, chunks: int = 3) -> None:
    """How ComfyUI writes: open, several writes, close (`created`, `modified`, `closed`)."""
    step = -(-len(data) // chunks)
    with path.open("wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()


class Writer(threading.Thread):
    """Drops files into a folder over time, like a generator at work; `finish()` joins it."""

    def __init__(
        self,
        folder: Path,
        files: list[tuple[str, bytes]],
        *,
        seed: int,
        pause: tuple[float, float] = (0.05, 0.5),
        ways: tuple[str, ...] = ("chunks", "rename"),
    ) -> None:
        super().__init__(name="fault-writer", daemon=True)
        self.folder, self.files, self.pause, self.ways = folder, files, pause, ways
        self.rng = random.Random(seed)
        self.written: list[str] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            for name, data in self.files:
                if self._halt.wait(self.rng.uniform(*self.pause)):
                    return
                way = self.rng.choice(self.ways)
                (write_in_chunks if way == "chunks" else write_atomically)(self.folder / name, data)
                self.written.append(name)
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.error = exc

    def finish(self, *, timeout: float = 120, halt: bool = False) -> list[str]:
        if halt:
            self._halt.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer did not finish in time"
        if self.error is not None:
            raise self.error
        return self.written
