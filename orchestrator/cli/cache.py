"""`orchestrate cache ...`: what the caches under the state folder hold, and clearing them (README "Cache size").
"""

from __future__ import annotations

import json
import sys

import click
from rich.table import Table

from orchestrator.cli.console import out_console
from orchestrator.cli.format import ago, cell, printable
from orchestrator.errors import ExitCode
from orchestrator.state.cachelimit import KINDS, LIMIT_ENV, cache_limit, cache_root, clear, format_size, info


def _interactive() -> bool:
    return sys.stdin.isatty()


@click.group()
def cache() -> None:
    """The caches under the state folder: stages, accuracy, Ray Tune logs, models, base models."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_info(as_json: bool) -> None:
    """Per kind: entries, size, oldest and newest use; the total against the limit; where the folder is."""
    limit = cache_limit()
    kinds = info()
    total = sum(int(k["bytes"] or 0) for k in kinds.values())
    if as_json:
        click.echo(json.dumps({"folder": str(cache_root()), "limit_bytes": limit, "total_bytes": total,
                               "kinds": kinds}, indent=2))
        return


    table = Table("kind", "entries", "size", "oldest use", "newest use")
    for kind, row in kinds.items():
        table.add_row(kind, str(row["entries"]), format_size(int(row["bytes"] or 0)),
                      ago(row["oldest_use"]), ago(row["newest_use"]))
    console = out_console()
    console.print(table)
    said = "no limit" if limit is None else f"limit {format_size(limit)}"
    console.print(f"total {format_size(total)}, {said} (${LIMIT_ENV}); folder {cell(cache_root())}")


@cache.command("clear")
@click.option("--kind", "kinds", multiple=True, metavar="KIND",
              help="Only this kind (repeatable): stages, accuracy, tune, models, tasks. Default: all.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def cache_clear(ctx: click.Context, kinds: tuple[str, ...], yes: bool) -> None:
    """Remove cached entries (files being written are left). The next run rebuilds what it needs."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        click.echo(f"error: unknown cache kind {printable(repr(unknown[0]))}: the kinds are {', '.join(KINDS)}", err=True)
        ctx.exit(ExitCode.USAGE)
    chosen = tuple(dict.fromkeys(kinds)) or KINDS
    question = f"remove every {', '.join(chosen)} cache entry under {printable(cache_root())}?"
    if not yes and not _interactive():  # a script, a pipe, cron: nobody to ask, so nothing is removed unasked
        click.echo("error: cache clear asks before removing, and stdin is not a terminal: "
                   "pass --yes to remove without asking (nothing removed)", err=True)
        ctx.exit(ExitCode.USAGE)
    if not yes and not click.confirm(question, default=False, err=True):
        click.echo("nothing removed", err=True)
        return
    removed, freed, left = clear(chosen)
    line = f"removed {removed} entries ({format_size(freed)}) of {', '.join(chosen)}"
    click.echo(line + (f"; {left} being written or not removable were left" if left else ""))
