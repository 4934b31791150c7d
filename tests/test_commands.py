"""The one command list: argparse, README's table and the run functions all come from it."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from distilray.cli import build_parser
from distilray.commands import BENCHMARKS, COMMANDS, config_class, find, markdown_table
from distilray.config import Config

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_table_is_the_command_list():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- commands:")
    block = text[text.index("\n", start) + 1 : text.index("<!-- end of commands -->")].strip()
    assert block == markdown_table(), "README's command table is stale: paste `python -m distilray.commands`"


def test_argparse_offers_every_command_and_benchmark():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {c.name for c in COMMANDS} | {"bench"}
    bench = next(a for a in sub.choices["bench"]._actions if a.dest == "benchmark")
    assert set(bench.choices) == {b.name for b in BENCHMARKS}


@pytest.mark.parametrize("command", COMMANDS + BENCHMARKS, ids=lambda c: c.name)
def test_each_command_runs_one_function_on_its_config(command):
    assert dataclasses.is_dataclass(command.config) and issubclass(command.config, Config)
    run = command.runner()
    assert list(inspect.signature(run).parameters)[0] == "cfg"
    if command.prints == "table":
        assert callable(getattr(inspect.getmodule(run), "format_table"))
    if command in BENCHMARKS:
        assert "json_out" in {f.name for f in dataclasses.fields(command.config)}


def test_lookup_by_name_and_by_config_header():
    assert find("train-lm").config is config_class("train-lm")
    assert find("cdlm", benchmark=True).config is config_class("bench cdlm")
    with pytest.raises(KeyError):
        find("no-such-command")
