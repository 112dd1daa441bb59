"""The shipped rule presets, copied into a folder a test may change."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def copy_presets(folder: Path, *, size: tuple[int, int] | None = None) -> Path:
    """The shipped presets copied into `folder`; `size` shrinks the default rule's output (speed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in resources.files("rules").iterdir():
        if entry.name.endswith(".toml"):
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    if size is not None:
        path = folder / "default.toml"
        text = path.read_text(encoding="utf-8")
        assert "width = 832\n" in text and "height = 480\n" in text, "the default preset changed its size lines"
        text = text.replace("width = 832\n", f"width = {size[0]}\n").replace("height = 480\n", f"height = {size[1]}\n")
        path.write_text(text, encoding="utf-8")
    return folder
