"""The YAML configs shipped with densefuse (installed as the data package ``densefuse_configs``).

Bare config names such as ``seg/synthetic_upernet_r18`` are looked up in ``./configs`` first, then
here (see :func:`densefuse.config.config_dirs`).
"""
