"""Every benchmark script answers `--help`: argparse formats help strings with `%`, so a literal percent sign in
one (say "ASR >= 95%") crashes the help of the whole script, and a user learns the options only by reading code."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py")
                 if p.stem != "__init__" and "def main(" in p.read_text())


def test_the_scripts_are_found():
    assert {"robustness", "speed", "reproduce"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_prints_usage_and_exits_cleanly(name, capsys):
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.lower().startswith("usage:"), out[:200]
