"""``optimum-cli moa ...``: the moa-hub CLI as an optimum-cli command.

Installed as ``optimum/commands/register/moa_hub.py`` (a PEP 420 namespace module that optimum-cli scans),
so it is only imported by optimum-cli. Everything after ``optimum-cli moa`` goes to ``moa-hub`` unchanged,
e.g. ``optimum-cli moa convert meta-llama/Llama-3.1-8B-Instruct --push --repo-id you/llama-moa``.
"""

from __future__ import annotations

import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class MoaCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="moa", help="Convert models to MoA sparse attention and push them (moa-hub).")

    def __init__(self, subparsers, args=None, command=None, from_defaults_factory=False, parser=None):
        # No nested sub-parsers: every remaining argument is handed to moa-hub's own CLI.
        self.args = args
        if command is not None:
            self.COMMAND = command
        if from_defaults_factory:
            self.parser, self.subparsers = None, subparsers
            return
        self.parser = subparsers.add_parser(self.COMMAND.name, help=self.COMMAND.help, add_help=False)
        self.subparsers = None
        self.parser.add_argument("moa_args", nargs=argparse.REMAINDER, help="moa-hub arguments (see moa-hub --help)")
        self.parser.set_defaults(func=lambda parsed: type(self)(None, parsed, from_defaults_factory=True))

    def run(self):
        from moa_hub.cli import main

        main(list(self.args.moa_args) or ["--help"])


REGISTER_COMMANDS = [MoaCommand]
