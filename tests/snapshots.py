"""Snapshot files under tests/snapshots: a change that moves one must say why in its commit.

Regenerate with MEGANEURA_UPDATE_SNAPSHOTS=1 (then review the diff).
"""

import difflib
import os
from pathlib import Path

DIR = Path(__file__).parent / "snapshots"


def assert_snapshot(name: str, text: str) -> None:
    path = DIR / name
    if os.environ.get("MEGANEURA_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    if not path.exists():
        raise AssertionError(f"no snapshot {name}: run with MEGANEURA_UPDATE_SNAPSHOTS=1")
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"{name} (snapshot)", f"{name} (now)", n=1))
        raise AssertionError(f"snapshot {name} moved:\n{diff[:4000]}")
