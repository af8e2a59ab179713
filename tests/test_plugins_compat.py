"""The compatibility table of docs/plugins.md is what this test measures (smp UPerNet, resnet18, 64x64).

Each cell runs one check of tests/test_smp_harness.py on the equalized, calibrated model in mode explicit
or fold and is "yes" when it runs and matches the eager forward within 1e-4. On a mismatch the test
prints the measured table to paste into the doc.
"""
import re
from pathlib import Path

import pytest

from tests.test_smp_harness import equalized, run_check

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
COLUMNS = {"torch.compile": "compile", "torch.export": "export", "ONNX (onnxruntime)": "onnx",
           "TorchScript (script)": "torchscript", "save / load": "save_load"}


def documented() -> dict[str, dict[str, str]]:
    text = DOC.read_text()
    block = text.split("<!-- compat-table -->", 2)[1]
    rows = [line for line in block.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = {header[i]: re.sub(r"\*", "", cells[i]).split()[0] for i in range(1, len(cells))}
    return out


def measured() -> dict[str, dict[str, str]]:
    pytest.importorskip("onnxruntime")
    out = {}
    for mode in ("explicit", "fold"):
        model = equalized("UPerNet", mode)
        row = {}
        for col, check in COLUMNS.items():
            try:
                ok = run_check(model, check) < 1e-4
            except Exception:  # noqa: BLE001 - a failing export is a "no" cell
                ok = False
            row[col] = "yes" if ok else "no"
        out[mode] = row
    return out


@pytest.mark.slow
def test_compatibility_table_is_measured():
    got = measured()
    table = "\n".join(["| mode | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
                      + [f"| {m} | " + " | ".join(r.values()) + " |" for m, r in got.items()])
    assert documented() == got, f"docs/plugins.md's table differs from the measurement:\n{table}"
