"""Packaging as users install it: a wheel built from the repository, installed (not editable) into a
fresh environment outside the checkout, runs ``densefuse train --task seg``; setup.cfg lists every package."""
import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", "build", "dist", "work_dirs", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _listed_packages():
    cfg = _setup_cfg()
    packages = [p.strip() for p in cfg["options"]["packages"].split() if p.strip()]
    package_dir = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, path = line.partition("=")
        package_dir[name.strip()] = path.strip()
    return packages, package_dir


def _package_path(name, package_dir):
    """Folder of an import name, following setup.cfg's package_dir."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[i:])
    return ROOT / Path(*parts)


def test_every_package_directory_is_listed():
    packages, package_dir = _listed_packages()
    for name in packages:
        assert (_package_path(name, package_dir) / "__init__.py").is_file(), name
    listed = {_package_path(name, package_dir).resolve() for name in packages}
    found = set()
    for top in ("densefuse", "tasks", "configs"):
        for init in (ROOT / top).rglob("__init__.py"):
            if not SKIP_DIRS & set(init.relative_to(ROOT).parts):
                found.add(init.parent.resolve())
    missing = sorted(str(p.relative_to(ROOT)) for p in found - listed)
    assert not missing, f"package directories missing from setup.cfg's packages: {missing}"
    entry = _setup_cfg()["options.entry_points"]["densefuse.tasks"]
    for line in entry.strip().splitlines():
        module = line.partition("=")[2].strip().partition(":")[0]
        assert module in packages, f"entry point {line.strip()!r} names a package that is not installed"


def _copy_source(dest: Path) -> Path:
    def ignore(directory, names):
        return [n for n in names if n in SKIP_DIRS or n.endswith(".egg-info") or n.startswith(".venv")]

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _site_dirs():
    """The running interpreter's site-packages (where torch, timm, ... are), never the checkout itself. A
    venv inside the checkout (CI's .venv-ci) is fine: a .pth line adds its site-packages as a plain path, so
    the editable install's own .pth finder there is not activated and the wheel's densefuse is imported."""
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    dirs |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return sorted(d for d in dirs if Path(d).is_dir() and Path(d).resolve() != ROOT)


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    src = _copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(wheels), str(src)], check=True, timeout=600)
    (wheel,) = wheels.glob("densefuse-*.whl")

    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_densefuse_test_deps.pth").write_text("\n".join(_site_dirs()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, timeout=600)

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    where = subprocess.run([str(python), "-c", "import densefuse, densefuse_configs, densefuse_tasks.seg; "
                            "print(densefuse.__file__); print(densefuse_configs.__file__)"],
                           cwd=run_dir, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where

    work = run_dir / "run"
    result = subprocess.run(
        [str(env_dir / "bin" / "densefuse"), "train", "--task", "seg", "--work-dir", str(work), "--no-progress",
         "--set", "train.iters=2", "--set", "train.batch_size=2", "--set", "train.val_interval=2",
         "--set", "train.ckpt_interval=2", "--set", "train.log_interval=1", "--set", "model.decode_head.channels=16",
         "--set", "model.auxiliary_head.channels=8", "--set", "data.crop_size=[64, 64]",
         "--set", "data.kwargs.num_train=4", "--set", "data.kwargs.num_val=2", "--set", "data.kwargs.size=[64, 64]",
         "--set", "calibration.num_images=4", "--set", "calibration.batch_size=2"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(work.rglob("metrics.csv")), sorted(str(p) for p in work.rglob("*"))
