"""The command group's handling of click's usage errors: one ``error:`` line, as every other user error."""
from __future__ import annotations

import sys
from typing import Any

import click


class OneLineUsageErrors(click.Group):
    """Usage errors (a missing option, a path of the wrong kind) as one ``error:`` line naming the option,
    exit 2, like every other user error; click's own form is three lines with the usage."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
