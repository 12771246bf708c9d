"""The ``smoothcert`` command line: commands, the resumable dataset runner and the demo."""

from smoothcert.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
