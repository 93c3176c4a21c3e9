"""`titans serve`: run the HTTP inference server under uvicorn.

Every server setting has a flag (`--max-batch-size` sets `max_batch_size`), which
overrides its `TITANS_*` environment variable. With no arguments the server loads the
default checkpoint with the in-process memory store on 127.0.0.1:8000. SIGTERM or Ctrl-C
stops accepting connections, lets running requests finish within
--shutdown-grace-seconds, commits their sessions' states and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# uvicorn's exit status when the app fails to start (uvicorn.config.STARTUP_FAILURE).
STARTUP_FAILURE = 3
SECRET_FIELDS = ("api_keys",)


def _flag_type(annotation: object):
    if annotation is int:
        return int
    if annotation is float:
        return float
    return str  # strings, and comma-separated lists


def _shown_default(name: str, value: object) -> str:
    if isinstance(value, list):
        return ",".join(value) or "none"
    return repr(value) if value == "" else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from titans.server.settings import Settings

    for name, field in Settings.model_fields.items():
        help_text = f"{field.description}; env TITANS_{name.upper()}"
        if name in SECRET_FIELDS:
            help_text += " (prefer the environment variable: other users can read command lines)"
        else:
            help_text += f" (default: {_shown_default(name, field.get_default(call_default_factory=True))})"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_flag_type(field.annotation),
                            default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))


def load_settings(args: argparse.Namespace):
    """Build Settings from the environment with the flags given on the command line on top."""
    from pydantic import ValidationError

    from titans.cli import CommandError
    from titans.server.settings import Settings

    overrides = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        # Listed without the input values, which could contain API keys.
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
                             for error in exc.errors(include_input=False))
        raise CommandError(f"invalid server settings: {problems}") from None


def _absorb_replayed_signal(signum: int, frame: object) -> None:
    log.debug("received signal %d after shutdown", signum)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from titans.cli import CommandError
    from titans.server.app import create_app
    from titans.server.context import configure_logging
    from titans.server.metrics import MULTIPROCESS_ENV
    from titans.server.settings import settings_to_environment

    settings = load_settings(args)
    if not Path(settings.checkpoint).is_dir():
        raise CommandError(f"checkpoint directory not found: {settings.checkpoint}; pass --checkpoint DIR "
                           "with a serving checkpoint (titans export writes one)")
    configure_logging(settings.log_level)
    common = dict(host=settings.host, port=settings.port, log_config=None, access_log=False,
                  timeout_graceful_shutdown=settings.shutdown_grace_seconds, lifespan="on")

    if settings.workers == 1:
        server = uvicorn.Server(uvicorn.Config(create_app(settings), **common))
        # After a graceful shutdown uvicorn raises the SIGTERM it handled once more, so that
        # the default action ends the process. This handler absorbs it, and the command
        # exits with status 0 instead of dying by the signal.
        previous = signal.signal(signal.SIGTERM, _absorb_replayed_signal)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return 0 if server.started else STARTUP_FAILURE

    # Several workers: each rebuilds the settings from TITANS_* variables, and metrics go
    # through a shared directory so /metrics on any worker returns the totals.
    os.environ.update(settings_to_environment(settings))
    metrics_dir = None
    if not os.environ.get(MULTIPROCESS_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="titans-metrics-")
        os.environ[MULTIPROCESS_ENV] = metrics_dir
    log.info("starting %d workers; metrics files in %s", settings.workers, os.environ[MULTIPROCESS_ENV])
    try:
        uvicorn.run("titans.server.app:create_app_from_environment", factory=True, workers=settings.workers,
                    **common)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
