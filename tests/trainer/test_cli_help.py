"""`tlserve train --help` and `tlserve export --help`: every default named once, never "(default: None)"."""

from __future__ import annotations

import re

import pytest

from tlserve.cli import main
from tlserve.trainer.config import TrainConfig


def option_help(capsys, command: str) -> dict[str, str]:
    """``{--flag: its help text on one line}`` from ``tlserve COMMAND --help``."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    blocks = re.split(r"\n(?=  -)", text)
    return {block.split()[0].rstrip(","): " ".join(block.split()) for block in blocks if block.strip()}


@pytest.mark.parametrize("command", ["train", "export"])
def test_no_option_says_default_none_or_names_its_default_twice(capsys, command):
    options = option_help(capsys, command)
    assert len(options) > 10
    for text in options.values():
        assert "default: None" not in text and "(default: )" not in text, text
        assert text.count("default") <= 1, text


def test_train_help_names_every_default_of_the_config(capsys):
    options = option_help(capsys, "train")
    defaults = TrainConfig()
    for flag, text in options.items():
        field = flag.lstrip("-").replace("-", "_")
        value = getattr(defaults, field, None)
        if value not in (None, "") and not isinstance(value, bool):
            assert f"(default: {value})" in text, text
    assert "(default: temperature)" in options["--calibrate"] and "{temperature,off}" in options["--calibrate"]
    assert "(default: mobilenet_v2)" in options["--arch"] and "(default: on)" in options["--channels-last"]
