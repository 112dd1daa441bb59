"""tmpfs mounts for the disk faults (root only), and filling one up."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from tests.conftest import wait_for


class Tmpfs:
    """A tmpfs mounted for one test (root only); `remount` toggles read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mount(self, size: str) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(self.path)], check=True)
        return self

    def remount(self, *, read_only: bool, timeout: float = 30) -> None:
        """Remount; a file open for writing makes the kernel answer EBUSY for a moment, so retry."""
        option = "remount,ro" if read_only else "remount,rw"

        def done() -> bool:
            result = subprocess.run(["mount", "-o", option, str(self.path)], capture_output=True)
            return result.returncode == 0

        wait_for(done, timeout=timeout, interval=0.02)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def unmount(self) -> None:
        if os.path.ismount(self.path):
            result = subprocess.run(["umount", str(self.path)], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], check=True)


def fill(folder: Path, *, leave: int = 0) -> Path:
    """Fill the file system of `folder` with one filler file until about `leave` bytes stay free."""
    slack = folder / "filler-slack"
    if leave:
        slack.write_bytes(b"\0" * leave)
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:
        for block in (b"\0" * (1 << 16), b"\0" * 512):
            try:
                while handle.write(block):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    if leave:
        slack.unlink()
    return filler
