"""Logging set-up shared by the project's command-line tools."""

import logging

PROJECT_LOGGERS = ("training", "export", "service", "bench")


def configure_logging(quiet: bool = False) -> None:
    """Our packages at INFO (WARNING with --quiet); third-party libraries only warn."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
