"""Shared fixtures: the real photographs of the test extra, and a thread-leak guard."""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from service import logs

# The fault suite's helper modules assert too: pytest explains their failures only if it rewrites them.
pytest.register_assert_rewrite("tests.faults", "tests.fake_comfyui")

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "china", "flower")


def _skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "motorcycle_left":
        left, _right, _disparity = skimage.data.stereo_motorcycle()
        return np.ascontiguousarray(left)
    return np.ascontiguousarray(getattr(skimage.data, name)())


def _sklearn_photo(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return np.ascontiguousarray(load_sample_image(f"{name}.jpg"))


def load_photo(name: str) -> np.ndarray:
    """A real photograph as an RGB uint8 (H, W, 3) array, read from the installed package."""
    if name in ("china", "flower"):
        return _sklearn_photo(name)
    return _skimage_photo(name)


def photo_file(name: str) -> Path:
    """The file a photograph ships as inside its package (PNG or JPEG), for codec tests."""
    if name in ("china", "flower"):
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg"
    import skimage.data

    stem = {"motorcycle_left": "motorcycle_left.png", "rocket": "rocket.jpg"}.get(name, f"{name}.png")
    return Path(skimage.data.__file__).parent / stem


def fast_extra(module: str) -> ModuleType:
    """A module of the `fast` extra. The test command installs it (`.[test,fast]`): missing, it is a failure
    to fix, not a skip that would pass CI with half of these tests never run."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not importable ({exc}): install the `fast` extra: pip install -e '.[test,fast]'")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """All listed real photographs by name."""
    return {name: load_photo(name) for name in PHOTO_NAMES}


@pytest.fixture(params=PHOTO_NAMES)
def photo(request: pytest.FixtureRequest, photos: dict[str, np.ndarray]) -> np.ndarray:
    """Each real photograph in turn."""
    return photos[request.param]


@pytest.fixture
def write_png(tmp_path: Path) -> Callable[[str, np.ndarray], Path]:
    """Save an RGB array as a PNG the way ComfyUI's SaveImage does (compress level 4)."""
    from PIL import Image

    def write(name: str, rgb: np.ndarray) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, compress_level=4)
        return path

    return write


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, interval: float = 0.05) -> object:
    """Poll until `predicate()` is truthy and return it; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout:.0f}s: {predicate!r}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def log_not_set_up() -> None:
    """A command an earlier test ran (cli.main) set its log up as JSON, not being on a terminal: each test starts
    with the log as a fresh process has it (a failing start's last word is then plain text)."""
    logs._json = False


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running after it (they would outlive a real stop)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
