"""One module per observation-page CLI command (``python -m vizlib <command>``).

Each module defines ``HELP`` (one line), ``configure(parser)`` adding its arguments, and
``run(args) -> dict`` returning the JSON payload; raise ``vizlib.cli.CliError`` for bad input.
``COMMANDS`` maps the command name to its module name; vizlib.cli imports them lazily.
"""

COMMANDS: dict[str, str] = {
    "mobile-former": "vizlib.commands.mobile_former",
    "moat": "vizlib.commands.moat",
    "fcvit": "vizlib.commands.fcvit",
    "conv2former": "vizlib.commands.conv2former",
    "erf": "vizlib.commands.erf",
}
