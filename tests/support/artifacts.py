"""Editing artifacts as an attacker can: change a file, then re-sign it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from amxc.runtime.artifact import manifest_digest


def resign(art: Path) -> None:
    """Recompute every listed file's sha256 and the manifest digest (hashes prove integrity,
    not authorship: anyone can do this)."""
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"] = {rel: hashlib.sha256((art / rel).read_bytes()).hexdigest() for rel in manifest["files"]}
    manifest["manifest_digest"] = manifest_digest(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=1))
