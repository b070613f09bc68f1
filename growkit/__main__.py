"""The `growkit` script and `python -m growkit`: signal handlers first, then the CLI and its heavy imports.

Installing them here rather than when growkit.cli is imported keeps a program that imports the CLI (e.g. to run
`app` in-process) in charge of its own Ctrl-C; see growkit.interrupts for why the CLI needs its own handlers.
"""

from growkit import interrupts


def main() -> None:
    interrupts.install()
    interrupts.pause_point("start-up")
    from growkit.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
