"""The manual pages in docs/man are what the generator makes from the parser and the
configuration's keys now: change the code, run `python -m bridge_migrate.manpage docs/man`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bridge_migrate import config, manpage
from bridge_migrate.cli import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs" / "man"


def test_the_kept_pages_are_the_generated_ones() -> None:
    for name, text in manpage.pages().items():
        assert (DOCS / name).read_text() == text, f"regenerate {name}"


def test_every_command_and_option_is_in_the_manual() -> None:
    page = manpage.section_8(build_parser())
    for name, sub in manpage._commands(build_parser()):
        assert f".SS {name}" in page
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                assert flag.replace("-", "\\-") in page, flag


def test_every_configuration_key_is_documented() -> None:
    fields = {f.name for f in dataclasses.fields(config.Config)}
    assert set(config.KEYS) == fields == set(config._KINDS)
