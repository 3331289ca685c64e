"""The README documents every command and option: its CLI reference is what the commands say they take."""

from __future__ import annotations

from pathlib import Path

from recserve.cli_reference import readme_section, reference

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_cli_reference_is_current() -> None:
    documented = readme_section((ROOT / "README.md").read_text())
    assert documented, "README.md has no generated CLI reference section"
    assert documented == reference(), "regenerate it: python -m recserve.cli_reference (and paste into README.md)"


def test_every_option_of_every_command_is_in_it() -> None:
    from typer.main import get_command

    from recserve.cli import app

    text = reference()
    group = get_command(app)
    for name, cmd in group.commands.items():
        subs = getattr(cmd, "commands", {name: cmd})
        for sub in subs.values():
            for p in sub.params:
                for opt in getattr(p, "opts", []):
                    if opt.startswith("--") and opt != "--help":
                        assert f"`{opt}`" in text, (name, opt)
