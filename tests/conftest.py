import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "seg", "synthetic_upernet_r18.yaml")


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
