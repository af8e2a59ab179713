"""Every ```python and ```bash block in README.md and docs/*.md runs as written.

Python blocks are exec'd in a fresh namespace in a temp directory (``configs`` linked in, so the
documented relative paths resolve). In shell blocks each ``densefuse ...`` line is parsed by the CLI and
its config (``--config``/``--task`` plus the documented ``--set`` values) is loaded and validated, so a
documented option, key or value that does not exist fails here. A block that cannot run here (pip, torchrun
on several nodes, a real dataset) is skipped only by a marker line right above it in the doc:
``<!-- docs-test: skip <reason> -->``; the skips are counted.
"""
import re
import shlex
from pathlib import Path

import click
import pytest

from densefuse.cli import _load, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|bash|shell|sh)\s*$")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s+(\S.*?)\s*-->$")

# Blocks in docs owned elsewhere that need a real dataset or checkpoint and have no skip marker yet.
NEEDS_MARKER: dict = {}


# Blocks that fail today for a reason outside the docs (strict: the test fails once they run).
KNOWN_FAILING: dict = {}


def blocks():
    """(doc, index, language, code, skip reason or None) for every runnable block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i, k = 0, 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m:
                j = i + 1
                while lines[j].strip() != "```":
                    j += 1
                prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
                skip = SKIP.match(prev)
                out.append((doc.relative_to(ROOT).as_posix(), k, m.group(1), "\n".join(lines[i + 1:j]),
                            skip.group(1) if skip else None))
                k += 1
                i = j
            i += 1
    return out


BLOCKS = blocks()


def _params():
    params = []
    for doc, k, lang, code, skip in BLOCKS:
        marks = []
        if (doc, k) in NEEDS_MARKER and skip is None:
            marks.append(pytest.mark.xfail(reason=f"needs a docs-test skip marker: {NEEDS_MARKER[doc, k]}"))
        if (doc, k) in KNOWN_FAILING:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILING[doc, k]))
        params.append(pytest.param(doc, lang, code, skip, id=f"{doc}#{k}", marks=marks))
    return params


def test_skips_are_marked_and_counted():
    skipped = [(doc, k, reason) for doc, k, _, _, reason in BLOCKS if reason]
    assert all(reason for _, _, reason in skipped)
    assert len(BLOCKS) >= 10 and len(skipped) < len(BLOCKS) / 2, skipped


def _commands(code):
    """Shell lines with continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield shlex.split(line, comments=True)


def _check_densefuse_line(argv):
    """Parse the line with the CLI and load its config the way the command would."""
    cmd = main.get_command(click.Context(main), argv[0])
    assert cmd is not None, f"no command {argv[0]}"
    ctx = cmd.make_context(argv[0], list(argv[1:]))
    p = ctx.params
    if argv[0] in ("train", "calibrate", "inspect"):
        _load(p.get("config"), p.get("overrides", ()), p.get("task"))
    elif argv[0] == "compare":
        for c in p.get("configs") or (None,):
            _load(c, p.get("overrides", ()), p.get("task"))


@pytest.mark.parametrize("doc, lang, code, skip", _params())
def test_doc_block_runs(doc, lang, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"{doc}: {skip}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    if lang == "python":
        exec(compile(code, doc, "exec"), {"__name__": "__docs__"})
        return
    for argv in _commands(code):
        assert argv[0] == "densefuse", f"{doc}: '{' '.join(argv)}' cannot run here; mark the block with a skip reason"
        _check_densefuse_line(argv[1:])
