"""`python -m models [FAMILY] [PATTERN]`: every registered component, its options and whether it runs here.

With a FAMILY, the family's contract (models/contract.py) is printed first: what a member is and the
hooks it may or must provide.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from models import FAMILIES, available, contract, list_components
from models.registry import REQUIRED, ComponentError


def table(family: str, pattern: str = "*") -> Table:
    rows = available(family, pattern)
    t = Table(title=escape(f"{family} — {FAMILIES[family]}"), title_justify="left")
    for column in ("name", "description", "options (defaults)", "here"):
        t.add_column(column, overflow="fold")
    for row in rows:
        options = ", ".join(f"{k}" if v is REQUIRED else f"{k}={v!r}" for k, v in row.options.items())
        if row.available:
            here = "[green]yes[/]" + (f" [yellow]({escape(row.note)})[/]" if row.note else "")
        else:
            here = f"[red]no[/]: {escape(row.reason)}"
        t.add_row(escape(row.name), escape(row.description), escape(options or "-"), here)
    return t


def main(argv: list[str]) -> int:
    console = Console()
    family = argv[0] if argv else None
    pattern = argv[1] if len(argv) > 1 else "*"
    try:
        if family:
            list_components(family)  # an unknown family: an error naming the closest one
            console.print(escape(contract.describe(family)), highlight=False)
        for fam in [family] if family else FAMILIES:
            console.print(table(fam, pattern))
    except ComponentError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
