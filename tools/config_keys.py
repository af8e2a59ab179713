"""Write the key tables of docs/configs.md from the settings' declarations (``--check``: only compare).

Each table sits between ``<!-- keys:NAME -->`` and ``<!-- /keys -->``: ``core`` is :class:`CoreConfig`, a task
name is that task's ``config_class`` without the core's keys.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "configs.md"
BLOCK = re.compile(r"(<!-- keys:(\w+) -->\n)(.*?)(<!-- /keys -->)", re.S)


def table(name: str) -> str:
    from densefuse.config.schema import keys_table
    from densefuse.config.sections import CoreConfig
    from densefuse.tasks import task_class

    if name == "core":
        return keys_table(CoreConfig)
    return keys_table(task_class(name).config_class, skip=CoreConfig)


def render(text: str) -> str:
    """``text`` with every key block regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configs.md is out of date")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python tools/config_keys.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    print(f"wrote {len(BLOCK.findall(new))} key tables to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
