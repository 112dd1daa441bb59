"""One image, start to finish, inside a worker process: the single runner.

decode -> resize -> analysis -> blur -> heatmap -> encode -> publish, each
stage timed here (core's stages are timed by core's runner and merged), so
metrics and logs have one source. `process_job` never raises: every failure
comes back as an `Outcome` the daemon can act on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

from core import pipeline
from service import __version__
from service.decode import DecodedImage, decode_file
from service.encode import encode_png
from service.errors import IncompleteImage, MadeFromFrame, PublishError, SinkwatchError
from service.file_hash import sha256_file
from service.ledger_stamps import file_stamp
from service.made_from_frame import LOCAL, FrameRefs, loaded_frame, sibling_text
from service.metrics import publish_error_reason
from service.ownership import Foreign, describes, own_frame, own_sidecar
from service.png_chunks import COMFYUI_TEXT_KEYS
from service.publish import Publisher
from service.rules import Rule

# name_taken: the frame at the job's name is no longer one sinkwatch wrote, or is the frame of an image once at
# the source's path (see `Job.gone`); nothing was published.
# adopted: the outputs of the source's current bytes were in the queue already (see `Job.adopt`); nothing was made.
Status = Literal["published", "rejected", "retry", "skipped", "name_taken", "adopted"]


@dataclass(frozen=True)
class Job:
    source: Path
    key: str
    name: str
    rule: Rule
    queue: Path
    max_bytes: int
    max_pixels: int
    known_sha256: str | None = None
    frame_sha256: str | None = None  # the ledger's hash of the frame last published under `name`
    # The source left its path since its frame was published (see `Ledger.mark_gone`), or the ledger has no row
    # to tell (lost, forgotten): the file there now may be another image, and the frame at `name`, if made from
    # other bytes, stays as it is.
    gone: bool = False
    # Outputs in the queue that the sidecar proves were made from the source's current bytes are taken over
    # rather than made, and sent, again, where the unchanged-content check has nothing to go by: a ledger
    # lost or moved with --state-dir, a retry, a rejected version since put back. Off with --force.
    adopt: bool = False
    # The source's last try before an incomplete file is rejected: a hole at the file's end that stayed through
    # every retry is no write in progress (ZFS with compression stores written zero blocks as holes).
    last_try: bool = False
    # The rejection the ledger holds for the source: the same bytes again (only its stamp changed: a touch, a
    # chmod, a restore from a backup) are rejected as before without being decoded, and it is no new rejection.
    rejected_as: Rejection | None = None
    # How ComfyUI names the frames in the queue: an image whose prompt loads one is made from it (a video's frame).
    frame_refs: FrameRefs = LOCAL


class Rejection(NamedTuple):
    reason: str
    sha256: str
    message: str


class _Identity(TypedDict):
    """The fields every Outcome of a job shares, spread into each one."""

    key: str
    name: str
    rule: str
    fingerprint: str


class _SourceStat(TypedDict):
    """The file stamp of the source as it was first stat'ed, spread into the outcomes that read it."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int


@dataclass(frozen=True)
class Outcome:
    key: str
    name: str
    rule: str
    fingerprint: str
    status: Status
    size: int | None = None
    mtime_ns: int | None = None
    ino: int | None = None
    ctime_ns: int | None = None
    sha256: str | None = None
    frame_sha256: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    error: Mapping[str, object] | None = None
    outputs: Mapping[str, str] = field(default_factory=dict)
    finished_at: float = 0.0
    upload_noted: bool = False  # adopted: the sidecar records an upload to ComfyUI
    codec_messages: tuple[str, ...] = ()  # what the codecs printed to stderr (see service.codec_messages)
    metadata_left_out: tuple[str, ...] = ()  # keywords of source text over the caps (see png_chunks.png_text)

    @property
    def reason(self) -> str | None:
        return None if self.error is None else str(self.error["reason"])

    @property
    def transient(self) -> bool:
        return bool(self.error and self.error.get("transient"))


def process_job(job: Job) -> Outcome:
    """Clean one source into the queue; report what happened, never raise."""
    base = _Identity(key=job.key, name=job.name, rule=job.rule.name, fingerprint=job.rule.fingerprint)
    timings: dict[str, float] = {}
    vanished = Outcome(**base, status="skipped", error={"reason": "vanished", "transient": False})
    try:
        before = os.stat(job.source)
    except FileNotFoundError:
        return vanished
    except OSError as exc:
        error = IncompleteImage(f"cannot stat source: {exc.strerror}", path=job.source, rule=job.rule.name)
        return Outcome(**base, status="retry", error=error.as_record())
    read = (before.st_size, before.st_mtime_ns)  # what a rejection's hash must still find (rejection_sha256)
    stat_fields = _SourceStat(
        size=before.st_size, mtime_ns=before.st_mtime_ns, ino=before.st_ino, ctime_ns=before.st_ctime_ns
    )
    try:
        # A published source whose stamp changed (a touch, a chmod, a copy over it): the same bytes need no decoding.
        known = job.known_sha256
        if known is not None and before.st_size <= job.max_bytes and _sha256(job.source) == known:
            _check_unchanged(job, before)
            return Outcome(**base, **stat_fields, status="skipped", sha256=known)
        earlier = job.rejected_as
        if earlier is not None and before.st_size <= job.max_bytes and _sha256(job.source) == earlier.sha256:
            # Decoding would only say it again, or crash the worker again (a `crashed` rejection).
            _check_unchanged(job, before)
            again = {"error": "Unchanged", "reason": earlier.reason, "message": earlier.message, "transient": False}
            return Outcome(**base, **stat_fields, status="rejected", error=again, sha256=earlier.sha256)
        if job.adopt and (adopted := _adopted(job, before, stat_fields)) is not None:
            return adopted
        params = job.rule.to_params()
        started = time.perf_counter()
        decoded = decode_source(
            job.source, job.rule, max_bytes=job.max_bytes, max_pixels=job.max_pixels, holes_pending=not job.last_try
        )
        timings["decode"] = time.perf_counter() - started
        _check_unchanged(job, before)
        publisher = Publisher(job.queue)
        text = decoded.text if "prompt" in decoded.text else sibling_text(job.source)
        if (frame_name := loaded_frame(text, job.source, publisher, job.frame_refs)) is not None:
            raise MadeFromFrame(
                f"ComfyUI made it from sinkwatch's frame {frame_name}.png (its prompt loads that frame): what a "
                "video job saved, not a new start frame"
            )

        result = pipeline.run(decoded.rgb, params)
        timings.update(result.timings)
        scores = result.scores.as_dict()

        started = time.perf_counter()
        frame = encode_png(result.cleaned, text=_frame_text(job.rule, scores, decoded.text))
        heatmap = encode_png(result.heatmap)
        timings["encode"] = time.perf_counter() - started

        sidecar = _sidecar(job, decoded.sha256, decoded.text, decoded.text_left_out, scores, timings, before)
        # Recovery after a crash compares this with the frame on disk: a sidecar alone proves nothing.
        frame_sha256 = hashlib.sha256(frame).hexdigest()
        sidecar["output"]["frame_sha256"] = frame_sha256
        started = time.perf_counter()
        # Checked last, just before writing: an edit made while the image was in the pool counts too.
        try:
            replaces = own_frame(publisher, job.name, job.key, recorded=job.frame_sha256, source=job.source)
            if replaces and not _may_replace(job, publisher, decoded.sha256):
                raise Foreign(f"{publisher.frame_path(job.name)} is the frame of another image once at this path")
        except Foreign as exc:
            taken = {"reason": "name_taken", "message": str(exc), "transient": True}
            return Outcome(**base, **stat_fields, status="name_taken", timings=timings, error=taken)
        if replaces:
            sidecar["output"]["replaces_frame_sha256"] = replaces
        paths = publisher.publish(job.name, frame=frame, heatmap=heatmap, sidecar=sidecar)
        timings["publish"] = time.perf_counter() - started
    except _Vanished:
        return vanished  # deleted while it was read: nothing to try again
    except SinkwatchError as exc:
        exc.path = exc.path or str(job.source)
        exc.rule = exc.rule or job.rule.name
        status: Status = "retry" if exc.transient else "rejected"
        record = exc.as_record()
        if isinstance(exc, PublishError):
            record["publish_reason"] = publish_error_reason(exc)
        sha256 = rejection_sha256(job, read) if status == "rejected" else None
        return Outcome(**base, **stat_fields, status=status, timings=timings, error=record, sha256=sha256)
    except Exception as exc:  # a bug must cost one image, never the worker
        record = {
            "error": type(exc).__name__,
            "reason": "crashed",
            "message": "".join(traceback.format_exception_only(exc)).strip(),
            "traceback": traceback.format_exc(limit=8),
            "path": str(job.source),
            "rule": job.rule.name,
            "transient": False,
        }
        sha256 = rejection_sha256(job, read)
        return Outcome(**base, **stat_fields, status="rejected", timings=timings, error=record, sha256=sha256)
    return Outcome(
        **base,
        **stat_fields,
        status="published",
        sha256=decoded.sha256,
        frame_sha256=frame_sha256,
        timings=timings,
        scores=scores,
        outputs={kind: path.name for kind, path in paths.items()},
        finished_at=time.time(),
        metadata_left_out=decoded.text_left_out,
    )


def decode_source(
    source: Path, rule: Rule, *, max_bytes: int, max_pixels: int, holes_pending: bool = True
) -> DecodedImage:
    """The source as `rule`'s pipeline takes it: what the daemon publishes is what `sinkwatch analyze` shows."""
    resize = rule.to_params().resize
    # A square that covers either orientation lets a large JPEG decode at reduced scale safely.
    side = max(resize.width, resize.height)
    return decode_file(
        source,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        background=rule.output.background,
        reduce_to=(side, side),
        holes_pending=holes_pending,
    )


def _adopted(job: Job, before: os.stat_result, stat_fields: _SourceStat) -> Outcome | None:
    """The outcome of taking over the outputs already in the queue for the source's current bytes, if any."""
    publisher = Publisher(job.queue)
    sidecar = own_sidecar(publisher, job.name, job.key, job.source)
    # The recorded size first: a source rewritten since needs no hashing to tell.
    if sidecar is None or sidecar["source"].get("size") != before.st_size:
        return None
    if not describes(sidecar, job.source, publisher, job.name):
        return None
    _check_unchanged(job, before)
    publisher.drop_reject(job.name)
    output = sidecar["output"]
    return Outcome(
        key=job.key,
        name=job.name,
        rule=sidecar["rule"]["name"],
        fingerprint=sidecar["rule"]["fingerprint"],
        status="adopted",
        **stat_fields,
        sha256=sidecar["source"]["sha256"],
        frame_sha256=output["frame_sha256"],
        scores={"width": output["width"], "height": output["height"]},
        outputs={"frame": f"{job.name}.png"},
        upload_noted="comfyui" in sidecar,
        finished_at=time.time(),
    )


def _may_replace(job: Job, publisher: Publisher, sha256: str) -> bool:
    """Whether the source's own frame at its name may give way to one made from its bytes `sha256`: the
    source stayed at its path since (an edit), or the frame was made from these very bytes (another rule)."""
    if not job.gone:
        return True
    sidecar = own_sidecar(publisher, job.name, job.key, job.source)
    return sidecar is not None and sidecar["source"].get("sha256") == sha256


class _Vanished(Exception):
    """The source was deleted while it was read."""


def _check_unchanged(job: Job, before: os.stat_result) -> None:
    """A source that changed while it was read is still being written: try again later."""
    try:
        after = os.stat(job.source)
    except FileNotFoundError as exc:
        raise _Vanished from exc
    # The whole stamp: a replacement of the same size and mtime (rsync -t) changes only inode and ctime.
    if file_stamp(after) != file_stamp(before):
        raise IncompleteImage("source changed while it was read", path=job.source)


def _sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError as exc:  # vanished, locked, unreadable for now: worth another try
        raise IncompleteImage(f"cannot read the file: {exc.strerror or exc}", path=path) from exc


def rejection_sha256(job: Job, read: tuple[int | None, int | None]) -> str | None:
    """The hash of a rejected source, which tells the same bytes rejected again, if its (size, mtime_ns) is still
    `read`, what it was when the attempt read it, before and after the hashing: a writer that finished meanwhile
    made bytes nobody rejected. None for those, for a file over the size limit (not read at all: raising the
    limit and touching the file tries it again), or for one that cannot be read."""

    def unchanged() -> bool:
        st = os.stat(job.source)
        return (st.st_size, st.st_mtime_ns) == read

    if read[0] is None or read[0] > job.max_bytes:
        return None
    try:
        if not unchanged():
            return None
        sha256 = sha256_file(job.source)
        return sha256 if unchanged() else None
    except OSError:
        return None


def _frame_text(rule: Rule, scores: Mapping[str, float], source_text: Mapping[str, str]) -> dict[str, str]:
    text = {
        key: value
        for key, value in source_text.items()
        if rule.output.keep_generator_metadata and key in COMFYUI_TEXT_KEYS
    }
    provenance = {"rule": rule.name, "fingerprint": rule.fingerprint, "version": __version__, "scores": scores}
    text["sinkwatch"] = json.dumps(provenance, sort_keys=True)
    return text


def _sidecar(
    job: Job,
    sha256: str,
    source_text: Mapping[str, str],
    left_out: tuple[str, ...],
    scores: Mapping[str, float],
    timings: Mapping[str, float],
    stat: os.stat_result,
) -> dict[str, Any]:
    return {
        "source": {
            "path": str(job.source),
            "key": job.key,
            "sha256": sha256,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "metadata": dict(source_text),
            "metadata_left_out": list(left_out),
        },
        "rule": {"name": job.rule.name, "fingerprint": job.rule.fingerprint},
        "output": {
            "frame": f"{job.name}.png",
            "heatmap": f"matrix/{job.name}.matrix.png",
            "width": int(scores["width"]),
            "height": int(scores["height"]),
        },
        "scores": dict(scores),
        "timings_ms": {stage: round(seconds * 1000, 3) for stage, seconds in timings.items()},
        "sinkwatch_version": __version__,
    }
