"""Example target: a PUMA-like system of 128 x 128 crossbars, described in ``puma-128.toml``."""

from pathlib import Path

PUMA_128 = Path(__file__).with_name("puma-128.toml")
