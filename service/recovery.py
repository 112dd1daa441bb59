"""Crash recovery.

A run killed mid-image leaves its ledger row in "processing". The sidecar a
publication writes next to its frame tells what is on disk: whose frame it is
(the source key) and which content it was made from (the source and frame
hashes). That is enough to settle a row whose frame was already published.

The rest are done again. The kill may have been an image's doing: an
out-of-memory kill of the whole control group (systemd's ``OOMPolicy=kill``,
a Kubernetes container) takes the daemon with the worker. Such rows are
handled as a worker death would be (see `service.engine`): each runs alone
until it finishes, and one that was alone when the run died again counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from service.ledger import Entry, Ledger
from service.ownership import describes, own_sidecar
from service.publish import Publisher


def recover(
    ledger: Ledger,
    publisher: Publisher,
    *,
    resolve: Callable[[str], Path],
    requeue: Callable[[Entry, Path, bool], object],
    published: Callable[[str, str, int, int], object] | None = None,
) -> int:
    """After a crash: settle the rows a dead run left in "processing"; returns how many.

    A frame published just before the crash only needs its ledger row: its
    sidecar names the source's current content and the frame's own hash. What
    a publication is owed besides (its upload to ComfyUI) goes to `published`
    (output name, key, width, height), as for a publication of this run.
    Anything else is handed to `requeue` (entry, path, alone) to be processed again; `alone` when it is
    the only one the dead run left, so that the run may have died of it.
    """
    recovered = 0
    cut_short: list[tuple[Entry, Path]] = []
    for entry in ledger.entries("processing"):
        path = resolve(entry.relpath)
        try:
            st = os.stat(path)
        except OSError:
            ledger.forget(entry.relpath)
            continue
        sidecar = own_sidecar(publisher, entry.output_name, entry.relpath, path) if entry.output_name else None
        if sidecar is not None and describes(sidecar, path, publisher, str(entry.output_name)):
            ledger.published(
                entry.relpath,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                ino=st.st_ino,
                ctime_ns=st.st_ctime_ns,
                sha256=sidecar["source"]["sha256"],
                rule=sidecar["rule"]["name"],
                fingerprint=sidecar["rule"]["fingerprint"],
                frame_sha256=sidecar["output"]["frame_sha256"],
            )
            if published is not None:
                width, height = sidecar["output"]["width"], sidecar["output"]["height"]
                published(str(entry.output_name), entry.relpath, width, height)
            recovered += 1
        else:
            cut_short.append((entry, path))
    for entry, path in cut_short:
        requeue(entry, path, len(cut_short) == 1)
    return recovered
