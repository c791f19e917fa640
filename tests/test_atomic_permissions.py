"""Atomically written files get the permissions a plain write gives them."""

from __future__ import annotations

import os
import stat

from genevolve.records import schema


def test_atomic_writes_give_the_permissions_a_plain_write_gives(tmp_path):
    """A new file gets 0o666 less the umask, not the temporary file's 0o600; a replaced file keeps its mode."""
    new = tmp_path / "new.json"
    schema.atomic_write_json(new, {"a": 1})
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~schema._UMASK
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    schema.atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640
