"""``fleet-collector``: serve the API and ingest, manage the database, train, run the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from collector import __version__
from collector.config import ConfigError, Settings, load_settings

log = logging.getLogger("fleet.collector")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "host", None):
        overrides["http_host"] = args.host
    if getattr(args, "port", None):
        overrides["http_port"] = args.port
    settings = load_settings(args.config)
    return settings.model_copy(update=overrides) if overrides else settings


def serve(args: argparse.Namespace) -> int:
    """Run the API, the dashboard and MQTT ingest in this process until SIGTERM/SIGINT."""
    import uvicorn

    from collector.app import create_app

    settings = _settings(args)
    logging.getLogger().setLevel(settings.log_level)
    app = create_app(settings)
    log.info("serving on http://%s:%d (OpenAPI at /docs)", settings.http_host, settings.http_port)
    # One worker: ingest lives in the lifespan, and N workers would mean N ingest clients.
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level=settings.log_level.lower(), workers=1)
    return 0


def db_upgrade(args: argparse.Namespace) -> int:
    """Upgrade the database schema to the newest migration."""
    from collector.db.engine import upgrade

    settings = _settings(args)
    upgrade(settings.database, args.revision)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fleet-collector`` argument parser."""
    parser = argparse.ArgumentParser(prog="fleet-collector", description="The fleet's central collector.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the HTTP API and MQTT ingest")
    p.add_argument("--config", help="YAML settings file (FLEET_* environment variables win)")
    p.add_argument("--host", help="listen address (FLEET_HTTP_HOST)")
    p.add_argument("--port", type=int, help="listen port (FLEET_HTTP_PORT)")
    p.set_defaults(func=serve)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    p = db.add_parser("upgrade", help="upgrade the schema (Alembic)")
    p.add_argument("--config", help="YAML settings file")
    p.add_argument("--revision", default="head", help="target revision (default head)")
    p.set_defaults(func=db_upgrade)

    from collector import demo, training

    training.register(sub)
    demo.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fleet-collector`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    return code
