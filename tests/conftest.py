import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests and the tools they run in-process may change torch's thread count (a benchmark pins one
    thread); put it back so no test depends on which test ran before it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "seg", "synthetic_upernet_r18.yaml")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted TINY training run (tests/test_engine.py), shared read-only by the tests that inspect
    its files and the resume tests that compare against it. ``train.keep_last=2`` only decides which
    ``iter_*.pth`` files stay; it changes no weight or metric. Returns (work dir, final metrics)."""
    from tests.test_engine import tiny_cfg, train

    wd = tmp_path_factory.mktemp("tiny_run") / "run"
    metrics = train(tiny_cfg("train.keep_last=2"), wd)
    return wd, metrics


@pytest.fixture
def default_cfg():
    import densefuse

    return densefuse.load_config(DEFAULT_CONFIG)


def synthetic_batches(cfg, n_batches=2, batch_size=4, split="train", seed=0):
    """Normalized synthetic image batches, as the trainer feeds calibration."""
    import densefuse
    from densefuse.data.loader import build_loader

    task = densefuse.get_task("seg", cfg)
    data = task.build_dataset(cfg, split)
    tf = task.build_transform(cfg, train=False)
    loader = build_loader(data, batch_size, train=True, num_workers=0, seed=seed)
    out = []
    for i, b in enumerate(loader):
        if i == n_batches:
            break
        out.append(tf(b)["image"])
    return out


def fold_mismatch(explicit, folded, x, margins=None):
    """Per fusion site: max relative difference of the fuse output in the interior, with both models
    fed the *same* branch inputs (captured from the explicit model), so border effects of earlier
    folded sites do not leak in. ``margins`` maps site name -> border width (default 1)."""
    from densefuse.fusion import Fusion

    sites = {n: m for n, m in explicit.named_modules() if isinstance(m, Fusion)}
    fsites = {n: m for n, m in folded.named_modules() if isinstance(m, Fusion)}
    inputs = {}
    hooks = [
        f.register_forward_pre_hook(lambda mod, args, kwargs, n=n: inputs.__setitem__(n, (args, kwargs)), with_kwargs=True)
        for n, f in sites.items()
    ]
    with torch.no_grad():
        explicit(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, (args, kwargs) in inputs.items():
        m = (margins or {}).get(n, 1)
        with torch.no_grad():
            a = sites[n](*args, **kwargs)[..., m:-m, m:-m]
            b = fsites[n](*args, **kwargs)[..., m:-m, m:-m]
        out[n] = float((a - b).abs().max() / a.abs().max())
    return out


def declared_tasks() -> list[str]:
    """The task names setup.cfg declares under ``densefuse.tasks``."""
    import configparser

    from densefuse.tasks import ENTRY_POINT_GROUP

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = cfg["options.entry_points"].get(ENTRY_POINT_GROUP, "").strip().splitlines()
    return [line.partition("=")[0].strip() for line in lines if line.strip()]


def _register_declared_tasks():
    """Register the tasks setup.cfg declares under ``densefuse.tasks`` that the installed metadata lacks (an
    editable install made before the entry point was added), so the CLI tests and doc runs find them. A
    fresh install lists them itself; this changes nothing then."""
    import configparser
    import importlib
    from importlib.metadata import entry_points

    from densefuse.tasks import ENTRY_POINT_GROUP, TASKS, register_task

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    installed = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for line in cfg["options.entry_points"].get(ENTRY_POINT_GROUP, "").strip().splitlines():
        name, _, target = (part.strip() for part in line.partition("="))
        if name and name not in installed and name not in TASKS:
            module, _, attr = target.partition(":")
            register_task(name)(getattr(importlib.import_module(module), attr))


_register_declared_tasks()
