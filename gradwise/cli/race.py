"""Placeholder replaced by the race subcommand."""


def register(subparsers):
    pass
