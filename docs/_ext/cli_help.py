"""``.. cli-help:: [COMMAND]``: the ``--help`` text of the ``skpatchcore`` command.

The text is produced by the command's own argument parser at build time, so
the documented options can never drift from the real ones.
"""

import os

from docutils import nodes
from docutils.parsers.rst import Directive

# A fixed width keeps the generated text the same on every terminal.
_WIDTH = "88"


def help_text(command=None):
    """Help of the whole command, or of one sub-command such as ``"fit"``."""
    from skpatchcore.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH
    try:
        parser = build_parser()
        if command is not None:
            subparsers = next(
                action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"
            )
            parser = subparsers.choices[command]
        return parser.format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


class CliHelp(Directive):
    optional_arguments = 1
    has_content = False

    def run(self):
        command = self.arguments[0] if self.arguments else None
        try:
            text = help_text(command)
        except (KeyError, StopIteration):
            raise self.error(f"'skpatchcore' has no sub-command {command!r}") from None
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app):
    app.add_directive("cli-help", CliHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
