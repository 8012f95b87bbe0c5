"""The command line: ``parser`` holds the grammar and ``main``; ``commands``, ``runtools`` and ``audit`` one function
per subcommand, imported only when it runs; ``checks`` what each checks first, without torch; ``flags`` the flags
derived from the config's fields. It parses and dispatches; no logic lives here."""

from imgclf.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
