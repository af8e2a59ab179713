"""``densefuse/cli.py`` holds the click commands and their option glue only; what the commands run lives
once, in the engine (one device resolver, one calibration-batch iterator, one work-dir path, one set of
output-safety checks). ``calibrate`` and ``inspect`` show the calibration progress like training does."""
import ast
import functools
import io
import re
import sys
from pathlib import Path

import pytest
import torch

import densefuse
from densefuse.engine import runtime
from densefuse.engine.calibrate import show_progress

from .test_cli import assert_user_error, cli

PACKAGE = Path(densefuse.__file__).parent

#: top-level functions of cli.py that are not click commands, and why they stay there
ALLOWED = {
    "_friendly": "the commands' error boundary: a user error becomes one line and exit 2",
    "_csv_list": "parses an option value (--modes, --seeds, --metrics) with the pinned message",
    "_config_list": "parses compare's repeated/comma/.txt --config option",
    "_check_num_images": "checks the --num-images option with the pinned message",
}

SMALL = ["--set", "model.decode_head.channels=16", "--set", "model.auxiliary_head.channels=8",
         "--set", "data.kwargs.size=[32,32]", "--set", "data.crop_size=[32,32]", "--set", "data.kwargs.num_train=4",
         "--set", "calibration.batch_size=2", "--set", "model.encoder.pretrained=null"]


def _decorator_name(node: ast.expr) -> str:
    """``main.command`` for ``@main.command("x")`` / ``@main.command()``; the dotted name otherwise."""
    if isinstance(node, ast.Call):
        node = node.func
    return ast.unparse(node)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@functools.lru_cache(maxsize=1)
def _package_functions() -> tuple[tuple[str, str], ...]:
    """(module path, function name) of every function defined anywhere in the package."""
    return tuple((p.relative_to(PACKAGE).as_posix(), node.name) for p in sorted(PACKAGE.rglob("*.py"))
                 for node in ast.walk(_tree(p)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_cli_defines_only_click_commands_and_a_short_list_of_glue():
    tree = _tree(PACKAGE / "cli.py")
    commands, others = [], []
    for node in tree.body:
        assert not isinstance(node, ast.ClassDef), f"cli.py defines class {node.name}: it belongs in the engine"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            decorators = {_decorator_name(d) for d in node.decorator_list}
            (commands if decorators & {"main.command", "click.group"} else others).append(node.name)
    assert not set(others) - set(ALLOWED), f"cli.py helpers that belong in the engine: {sorted(set(others) - set(ALLOWED))}"
    assert {"main", "train", "eval_cmd", "calibrate_cmd", "inspect_cmd", "predict_cmd", "convert_cmd", "compare_cmd",
            "export_cmd", "check_data_cmd"} <= set(commands)
    # every allow-listed name still exists (a stale entry would let a new helper hide behind it)
    assert set(ALLOWED) <= set(others)


@pytest.mark.parametrize("name", ["resolve_device", "to_device", "calibration_batches", "default_work_dir",
                                  "check_writable", "check_out_file", "refuse_overwrite", "output_stems",
                                  "image_paths", "check_pixels", "read_model_checkpoint"])
def test_each_engine_helper_is_defined_once_in_the_package(name):
    defined = [path for path, fn in _package_functions() if fn.lstrip("_") == name]
    assert len(defined) == 1 and defined[0].startswith("engine/"), defined


def test_the_default_work_dir_root_is_written_in_one_place():
    """The string ``"work_dirs"`` occurs in one module of the package: the one function that builds every
    default output path (a run, calibrate's CSV, inspect's folder, compare's root)."""
    places = [f"{p.relative_to(PACKAGE).as_posix()}:{n.lineno}" for p in sorted(PACKAGE.rglob("*.py"))
              for n in ast.walk(_tree(p)) if isinstance(n, ast.Constant) and n.value == "work_dirs"]
    assert len(places) == 1 and places[0].startswith("engine/runtime.py"), places


def test_default_work_dir_names_every_default_output():
    cfg = {"name": "demo", "work_dir": None}
    run = runtime.default_work_dir(cfg)
    assert run.parent == Path("work_dirs/demo") and re.fullmatch(r"\d{8}_\d{6}", run.name)
    csv = runtime.default_work_dir(cfg, "{name}/calibration-{time}.csv")
    assert csv.parent == Path("work_dirs/demo") and csv.name.startswith("calibration-") and csv.suffix == ".csv"
    assert runtime.default_work_dir({"name": "demo", "work_dir": "/runs"}, "{name}_compare") == Path("/runs/demo_compare")
    assert runtime.default_work_dir(cfg, "compare") == Path("work_dirs/compare")


def test_one_device_resolver_with_one_error_class(monkeypatch):
    """The config check and the trainer both call :func:`resolve_device`: a user error either way."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(densefuse.ConfigError, match="device 'cuda:1' requested but CUDA is not available"):
        runtime.resolve_device("cuda:1")
    with pytest.raises(densefuse.ConfigError, match="is not a device name"):
        runtime.resolve_device("npu")


def test_a_cuda_device_without_cuda_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli("train", "--set", "device=cuda"), "device 'cuda' requested but CUDA is not available")
    assert not any(tmp_path.iterdir())  # nothing written


def _bar_lines(text: str, desc: str) -> list[str]:
    return [part for part in text.replace("\r", "\n").splitlines() if part.startswith(desc)]


def test_calibrate_progress_shows_the_passes_and_is_quiet_off_a_terminal(tmp_path):
    args = ["calibrate", *SMALL, "--num-images", "2"]
    shown = cli(*args, "--progress", "--out", tmp_path / "a.csv")
    assert shown.exit_code == 0, shown.output
    bars = _bar_lines(shown.stderr, "calibrate (pass 1)")
    assert bars and any("2/2" in b for b in bars), shown.stderr
    assert _bar_lines(shown.stderr, "calibrate (pass 2)")  # the upernet's chained FPN site takes a second pass
    assert "| site" in shown.stdout and (tmp_path / "a.csv").is_file()
    quiet = cli(*args, "--out", tmp_path / "b.csv")  # CliRunner's stderr is no terminal
    assert quiet.exit_code == 0 and "calibrate (pass" not in quiet.output
    # the same statistics with and without the bar: the bar only counts
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_progress_is_on_a_terminal_unless_no_progress(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(None) and show_progress(True) and not show_progress(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not show_progress(None) and show_progress(True)


def test_inspect_progress_shows_the_calibration_and_the_measurement(tmp_path):
    r = cli("inspect", *SMALL, "--num-images", "2", "--progress", "--out", tmp_path / "insp")
    assert r.exit_code == 0, r.output
    assert _bar_lines(r.stderr, "calibrate (pass 1)") and _bar_lines(r.stderr, "measure (pass 1)"), r.stderr
    assert (tmp_path / "insp" / "inspect.csv").is_file()
