"""Checkpoints that survive a kill and say when they are damaged: atomic writes with a SHA-256 record
beside each file, verified on load."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

# The files a run writes into --out.
RUN_FILES = ("checkpoint.pt", "final.pt", "history.json", "curves.png", "misclassified.png", "lr_find.png", "stn.png")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a file. Beside it,
    PATH.sha256 records its SHA-256 (read back by `load_verified`). While the new file replaces the old
    one, the record lists both hashes, so a kill at any instant leaves a file that matches its record."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp) if path.suffix == ".pt" else tmp.write_text(obj)
    new = sha256(tmp)
    record = checksum_file(path)
    old = record.read_text().split() if record.exists() else []
    _write_replace(record, "\n".join([new, *old[:1]]) + "\n")
    os.replace(tmp, path)
    _write_replace(record, new + "\n")


def _write_replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_verified(path: Path, what: str):
    """torch.load a file written by atomic_save after checking it against its recorded SHA-256. Any
    failure ends the run with a message that names the file and what to do."""
    if not path.exists():
        raise SystemExit(f"error: {what}: {path} does not exist")
    record = checksum_file(path)
    if record.exists():
        expected = record.read_text().split()
        if sha256(path) not in expected:
            raise SystemExit(
                f"error: {what}: {path} is damaged: its SHA-256 differs from the one recorded in {record.name} "
                "when it was written (a truncated copy, or changed bytes). Restore the file from a copy, or start "
                "a new run with --out; final.pt beside it holds the best weights so far, if it verifies."
            )
    else:
        print(
            f"warning: {path} has no {record.name} (written by an older version?): its contents cannot be verified",
            file=sys.stderr,
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SystemExit(
            f"error: {what}: {path} could not be read ({type(exc).__name__}: {exc}). Restore it "
            "from a copy, or start a new run with --out."
        ) from None
