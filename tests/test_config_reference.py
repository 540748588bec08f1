"""The configuration reference and the starter config are what the config model renders now.

docs/configuration.md and config.example.toml are generated from the field descriptions in
argus_agent/config.py; a key added, renamed or re-described without regenerating them fails
here, with the command that fixes it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from argus_agent import configdoc
from argus_agent.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_has_a_description_and_an_example_where_one_is_needed() -> None:
    assert configdoc.missing_docs() == []


def test_docs_configuration_md_is_what_the_model_renders() -> None:
    checked_in = (ROOT / configdoc.REFERENCE_PATH).read_text()
    assert checked_in == configdoc.reference_markdown(), (
        "docs/configuration.md is stale: run `argus-agent config reference > docs/configuration.md`"
    )


def test_the_starter_config_is_what_the_model_renders_and_loads_as_the_defaults() -> None:
    packaged = ROOT / configdoc.EXAMPLE_PATH
    assert packaged.read_text() == configdoc.example_toml(), (
        "argus_agent/data/config.example.toml is stale: run "
        "`argus-agent config example > argus_agent/data/config.example.toml`"
    )
    # The file at the top of the checkout is the one README links to.
    assert (ROOT / "config.example.toml").read_text() == packaged.read_text()
    assert load_settings(packaged, environ={}) == Settings()


def test_the_cli_prints_the_same_texts() -> None:
    for action, expected in (
        ("reference", configdoc.reference_markdown()),
        ("example", configdoc.example_toml()),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "argus_agent.cli", "config", action],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected
