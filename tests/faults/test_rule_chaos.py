"""Rule files edited, broken, deleted and restored while images flow.

Promise under test: the daemon never dies and never uses a rule folder state
that did not validate: every image is cleaned by the rule that some valid
state of the folder selects for it, and its sidecar names that rule (name and
fingerprint). Each failed reload keeps the last good rules, is logged, and is
counted in ``sinkwatch_rule_reload_failures_total``.

Every change below replaces one file atomically (as editors that write a new
file and rename it do), so the folder only ever passes through states this
test has seen and judged with ``load_rules``.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import RuleError
from service.rules import RuleSet, load_rules
from tests.conftest import wait_for
from tests.e2e.conftest import DaemonProcess
from tests.faults.images import Images
from tests.faults.outputs import check_published_set, rejects, sidecars
from tests.faults.presets import copy_presets
from tests.faults.readings import health, log_records, metric
from tests.faults.writers import Writer

pytestmark = pytest.mark.slow

SEED = 1701
SOURCES = 60
ACTIONS = (
    *("edit", "edit", "edit", "break", "break", "delete", "restore"),
    *("break default", "restore default", "duplicate", "unduplicate", "extra", "no extra", "sighup"),
)


def chaos_rule(version: int) -> bytes:
    """A valid custom rule; each version has its own fingerprint."""
    return (
        f'name = "chaos"\nmatch = ["chaos_*"]\npriority = 50\n'
        f"[resize]\nwidth = 128\nheight = 128\n"
        f"[blur]\nsigma = {0.6 + 0.1 * version:.1f}\n"
        f"[mask]\nthreshold = {0.10 + 0.01 * (version % 10):.2f}\n"
    ).encode()


BROKEN = {
    "toml": b'name = "chaos\n[resize\nwidth = 128\n',
    "field": b'name = "chaos"\nmatch = ["chaos_*"]\n[resize]\nwidth = 833\nheight = 128\n',
    "unknown key": b'name = "chaos"\nmatch = ["chaos_*"]\nsharpen = true\n',
    "type": b'name = "chaos"\nmatch = ["chaos_*"]\n[resize]\nwidth = "128"\n',
    "not utf-8": b'name = "chaos"\ndescription = "\xff\xfe"\n',
    "bad glob": b'name = "chaos"\nmatch = ["chaos/../x"]\n',
}


class RuleFolder:
    """The rules folder as a model (file -> bytes); every change is one atomic replace or delete."""

    def __init__(self, folder: Path, scratch: Path) -> None:
        self.folder, self.scratch = folder, scratch
        self.files = {p.name: p.read_bytes() for p in folder.glob("*.toml")}
        self.valid: dict[str, RuleSet] = {}
        self.broken = 0
        self.ok = True
        self.judge()

    def put(self, name: str, data: bytes) -> None:
        temp = self.scratch / f"{name}.new"
        temp.write_bytes(data)
        os.replace(temp, self.folder / name)
        self.files[name] = data
        self.judge()

    def delete(self, name: str) -> None:
        if name in self.files:
            (self.folder / name).unlink()
            del self.files[name]
            self.judge()

    def judge(self) -> None:
        try:
            rules = load_rules(self.folder)
        except RuleError:
            self.broken += 1
            self.ok = False
            return
        self.ok = True
        self.valid.setdefault(rules.fingerprint, rules)


def test_rule_chaos_while_images_flow(
    tmp_path: Path, images: Images, daemons: list[DaemonProcess], counts: Callable[..., None]
) -> None:
    rng = random.Random(SEED)
    watch, queue, scratch = tmp_path / "watch", tmp_path / "queue", tmp_path / "scratch"
    watch.mkdir()
    scratch.mkdir()
    folder = copy_presets(tmp_path / "rules", size=(128, 128))
    (folder / "chaos.toml").write_bytes(chaos_rule(0))
    rules = RuleFolder(folder, scratch)
    good_default = rules.files["default.toml"]
    daemon = DaemonProcess(watch, queue, tmp_path / "daemon.log", "--rules", str(folder))
    daemons.append(daemon)
    daemon.start()
    assert daemon.proc is not None

    files = [(f"{'chaos' if i % 2 else 'plain'}_{i:03d}.png", images.make(i, side=128)) for i in range(SOURCES)]
    writer = Writer(watch, files, seed=SEED, pause=(0.1, 0.4))
    writer.start()
    version, actions, hangups = 0, Counter[str](), 0
    try:
        while writer.is_alive():
            # A broken folder is mended half the time, so that valid edits get their turn to be loaded.
            action = "repair" if not rules.ok and rng.random() < 0.5 else rng.choice(ACTIONS)
            if action == "edit":
                version += 1
                rules.put("chaos.toml", chaos_rule(version))
            elif action == "break":
                kind = rng.choice(sorted(BROKEN))
                rules.put("chaos.toml", BROKEN[kind])
                action = f"break ({kind})"
            elif action == "delete":
                rules.delete("chaos.toml")
            elif action == "restore":
                rules.put("chaos.toml", chaos_rule(version))
            elif action == "repair":
                rules.put("chaos.toml", chaos_rule(version))
                rules.put("default.toml", good_default)
                rules.delete("dup.toml")
            elif action == "break default":
                rules.put("default.toml", good_default.replace(b"width = 128", b"width = 130"))
            elif action == "restore default":
                rules.put("default.toml", good_default)
            elif action == "duplicate":
                rules.put("dup.toml", chaos_rule(version + 100))  # a second rule named "chaos"
            elif action == "unduplicate":
                rules.delete("dup.toml")
            elif action == "extra":
                rules.put("extra.toml", b'name = "extra"\nmatch = ["plain_*[13579].png"]\npriority = 5\n')
            elif action == "no extra":
                rules.delete("extra.toml")
            else:
                daemon.signal(signal.SIGHUP)
                hangups += 1
            actions[action] += 1
            assert daemon.proc.poll() is None, daemon.log.read_text()[-3000:]
            writer.join(rng.uniform(0.15, 0.6))  # the pace of the edits
    finally:
        writer.finish()

    wait_for(lambda: len(sidecars(queue)) + len(rejects(queue)) >= SOURCES, timeout=90)
    assert health(daemon) == 200
    failures = metric(daemon, "sinkwatch_rule_reload_failures_total")
    assert daemon.stop() == 0, daemon.log.read_text()[-3000:]

    messages = [str(r["message"]) for r in log_records(daemon.log)]
    logged_failures = sum(m.startswith("rules not reloaded") for m in messages)
    reloads = sum(m.startswith("rules reloaded") for m in messages)
    by_key = check_published_set(queue)
    used = Counter(f"{s['rule']['name']}@{s['rule']['fingerprint'][:6]}" for s in by_key.values())
    counts(
        sources=SOURCES,
        actions=sum(actions.values()),
        by_action=dict(actions),
        sighups=hangups,
        valid_states=len(rules.valid),
        broken_states=rules.broken,
        reloads=reloads,
        reload_failures=int(failures),
        rule_versions_used=dict(used),
    )
    assert rejects(queue) == {}
    assert sorted(by_key) == sorted(name for name, _ in files)
    for key, sidecar in by_key.items():
        named = (sidecar["rule"]["name"], sidecar["rule"]["fingerprint"])
        chosen = {(s.select(key).name, s.select(key).fingerprint) for s in rules.valid.values()}
        assert named in chosen, f"{key} was cleaned by {named}, which no valid state of the folder chose for it"
    assert rules.broken > 0 and failures > 0, "the chaos never broke the rules"
    assert failures == logged_failures, "every failed reload is logged once and counted once"
    assert failures <= rules.broken + hangups, "more reload failures than broken states"
    assert reloads > 0
