"""`llmplan ui`: the dashboard's server: its page and JSON API (web_api.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .cluster import reachable_address
from .jobs import db_option

DEFAULT_PORT = 8321  # Ray's dashboard is 8265


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; off loopback a token is required.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--token", default=None, help="The token calls must carry off loopback [default: generated, printed].")
@click.option("--root", "roots", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder that submitted data, model and output paths may be in (repeatable) "
                   "[default: the working directory].")
@click.option("--address", metavar="HOST:PORT", callback=reachable_address,
              help="Ray cluster for submitted jobs [default: $LLMPLAN_RAY_ADDRESS, else llmplan's local Ray head].")
@db_option
def ui(host: str, port: int, token: str | None, roots: tuple[Path, ...], address: str | None,
       db_url: str | None) -> None:
    """Serve the dashboard (its page at / and its JSON API) on HOST:PORT until interrupted."""
    from llmplan.runtime.jobs.scheduler import worker_database_url
    from llmplan.runtime.store.db import database_url_from_environment
    from llmplan.runtime.store.opening import open_store

    from .web_api import bind, make_config, server_for

    engine = open_store(database_url_from_environment(db_url))
    url = worker_database_url(engine)
    engine.dispose()
    config = make_config(url, host, port, token, roots or (Path.cwd(),), address)
    listener = bind(config)
    server = server_for(config, listener)
    bound_host, bound_port = listener.getsockname()[:2]
    page = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}/"
    if config.needs_token:
        page += f"#token={config.token}"
        click.echo(f"token: {config.token}  (API calls send it as: Authorization: Bearer TOKEN)", err=True)
    click.echo(f"llmplan dashboard on {page}", err=True)
    server.run(sockets=[listener])  # until interrupted (uvicorn handles SIGINT and SIGTERM)
