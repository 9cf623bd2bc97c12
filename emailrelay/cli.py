"""The ``emailrelay`` command."""

from __future__ import annotations

import argparse
import sys

from emailrelay import __version__

EXIT_USAGE = 2


def _serve(args: argparse.Namespace) -> int:
    from emailrelay.app import run
    from emailrelay.config import ConfigError, load_settings
    from emailrelay.logs import configure_logging

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"emailrelay: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format, settings.log_add_source)
    return run(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailrelay",
        description="Transactional email relay: NATS requests in, SMTP out.",
    )
    parser.add_argument("--version", action="version", version=f"emailrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the relay (configured by environment variables; see README)"
    )
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
