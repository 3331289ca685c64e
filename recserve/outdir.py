"""The one rule for a command's ``--out`` directory: an existing model is never overwritten by accident."""

from __future__ import annotations

from pathlib import Path

from recserve.errors import ConfigError


def check_out(out: Path, force: bool, owned: tuple[str, ...], command: str) -> None:
    """``out`` must be new or empty; with ``force`` it may also hold an earlier output of ``command`` (only the
    files in ``owned``), which is then replaced. ConfigError otherwise, saying what to do."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if not force:
        raise ConfigError(f"--out {out} is not empty ({', '.join(present[:4])}{', ...' if len(present) > 4 else ''}); "
                          f"choose a new directory, or pass --force to replace an earlier `{command}` output")
    foreign = [n for n in present if n not in owned]
    if foreign:
        raise ConfigError(f"--out {out} holds files `{command}` did not write ({', '.join(foreign[:4])}); "
                          f"--force replaces only an earlier `{command}` output: choose a new directory")
