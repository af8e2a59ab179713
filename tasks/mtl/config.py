"""The ``mtl`` config section, declared in one place (:class:`MTLSection`, :class:`MTLConfig`): its keys with their
defaults, rules and docs, and the checks the rules cannot make (sub-task names, one head per sub-task, the dataset's
labels, the sub-tasks' own sections). The composite task reads the section only through :func:`mtl_section`.

``mtl`` holds its sub-tasks' settings because a run config has one task section: ``mtl.heads.<task>`` is that
task's decoder and predictor (the keys of ``model.decode_head``), ``mtl.sections.<task>`` its own section
(e.g. ``mtl.sections.depth.max_depth``), checked against the sub-task's declared keys and rules.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from densefuse.config import Rule, Section, build_section, check_kwargs, configclass, plain, setting, subsection
from densefuse.config.sections import CoreConfig
from densefuse.errors import ConfigError, did_you_mean

from .weighting import WEIGHTINGS

#: the tasks a multi-task model can combine (those the joint datasets hold labels for)
SUBTASKS = ("seg", "depth", "normals")
#: ``mtl.heads.<task>.predictor`` when a head names none
DEFAULT_PREDICTORS = {"seg": "cls_seg", "depth": "depth", "normals": "normals"}
#: ``data.type`` -> the tasks it has labels for, and its accepted ``data.kwargs``
DATASET_TASKS = {"synthetic": SUBTASKS, "nyuv2": SUBTASKS, "cityscapes": ("seg", "depth")}
DATASET_KWARGS: dict[str, tuple[str, ...]] = {
    "synthetic": ("num_train", "num_val", "size", "seed", "focal", "drop"),
    "nyuv2": ("size", "partial_labels"),
    "cityscapes": ("partial_labels",),
}
#: segmentation classes of each dataset (``model.num_classes`` must match when ``seg`` is a sub-task)
DATASET_CLASSES = {"synthetic": 3, "nyuv2": 13, "cityscapes": 19}

@configclass
class MTLSection(Section):
    tasks: list = setting(["seg", "depth", "normals"], Rule("list", item=Rule("name")),
                          "the sub-tasks trained on the shared encoder: seg, depth, normals")
    heads: Optional[dict] = setting(None, Rule("mapping", nullable=True),
                                    "`{task: {type, predictor, <head args>}}`: a decoder for every task of mtl.tasks",
                                    open=True)
    weighting: str = setting("equal", Rule("str", choices=WEIGHTINGS), "loss balancing: equal, fixed, uncertainty, dwa")
    weights: Optional[dict] = setting(None, Rule("mapping", nullable=True), "fixed: `{task: w >= 0}` for every task",
                                      open=True)
    uncertainty_kinds: Optional[dict] = setting(None, Rule("mapping", nullable=True),
                                                "uncertainty: `{task: regression | classification}`", open=True)
    dwa_temperature: float = setting(2.0, Rule("number", gt=0), "DWA's softmax temperature")
    dwa_interval: int = setting(100, Rule("int", min=1), "DWA: training steps per interval (mtan: one epoch)")
    sections: Optional[dict] = setting(None, Rule("mapping", nullable=True),
                                       "`{task: that task's own section}`, e.g. `{depth: {max_depth: 10.0}}`", open=True)


@configclass
class MTLConfig(CoreConfig):
    mtl: MTLSection = subsection(MTLSection, "the multi-task model's own settings")


def mtl_section(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``mtl`` section of ``cfg`` (its defaults when ``cfg`` has none), as a plain dict (a copy)."""
    return copy.deepcopy(plain(cfg["mtl"] if "mtl" in cfg else MTLSection()))


def check_subtasks(tasks: Any) -> list[str]:
    """``mtl.tasks`` as a list of known, distinct task names; else a ConfigError with a did-you-mean hint."""
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ConfigError(f"mtl.tasks must be a non-empty list of tasks out of {', '.join(SUBTASKS)}, got {tasks!r}")
    out = [str(t) for t in tasks]
    for t in out:
        if t not in SUBTASKS:
            raise ConfigError(f"mtl.tasks names unknown task '{t}'{did_you_mean(t, SUBTASKS)}; "
                              f"a multi-task model combines: {', '.join(SUBTASKS)}")
    if len(set(out)) != len(out):
        raise ConfigError(f"mtl.tasks names a task twice: {out}")
    return out


def head_spec(section: Mapping[str, Any], task: str) -> dict[str, Any]:
    """``mtl.heads.<task>`` with its default predictor filled in; a missing head is a ConfigError."""
    heads = section.get("heads") or {}
    spec = heads.get(task)
    if not isinstance(spec, Mapping) or not spec.get("type"):
        have = ", ".join(str(k) for k in heads) or "none"
        raise ConfigError(f"mtl.heads has no head for task '{task}': add mtl.heads.{task} with a type, e.g. "
                          f"{{type: hrnet, channels: 64}} (heads given: {have})")
    return {"predictor": DEFAULT_PREDICTORS[task], **dict(spec)}


def subtask_section(section: Mapping[str, Any], task: str) -> Section:
    """The sub-task's own section (``cfg.<task>`` of its config class) from ``mtl.sections.<task>``: every key and
    value checked against what the sub-task declares, its defaults filled in."""
    from densefuse.tasks import task_class

    given = dict((section.get("sections") or {}).get(task) or {})
    own = task_class(task).config_class.section_class(task)
    if own is None:
        check_kwargs(f"mtl.sections.{task}", given, [], owner=f"task '{task}'")
        return Section()
    return build_section(own, given, f"mtl.sections.{task}.")


def validate_mtl(cfg: Mapping[str, Any]) -> list[str]:
    """Every check of the ``mtl`` section and of what it needs from the rest of the config, before any work;
    returns the sub-task list."""
    from densefuse.model import head_arguments

    section = mtl_section(cfg)
    tasks = check_subtasks(section["tasks"])
    for key in ("heads", "sections", "weights", "uncertainty_kinds"):
        for name in section.get(key) or {}:  # entries of tasks left out of mtl.tasks are unused, not wrong
            if name not in SUBTASKS:
                raise ConfigError(f"mtl.{key} names unknown task '{name}'{did_you_mean(str(name), SUBTASKS)}; "
                                  f"a multi-task model combines: {', '.join(SUBTASKS)}")
    for t in tasks:
        spec = head_spec(section, t)
        where = f"mtl.heads.{t}"
        try:
            accepted = head_arguments(where, spec)
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        check_kwargs(where, spec, accepted, owner=f"{where}.type '{spec['type']}'")
        subtask_section(section, t)
    weighting_from(section, tasks)  # its own checks: fixed weights for every task, uncertainty kinds, DWA
    model, data = cfg["model"], cfg["data"]
    if model["type"] != "mtl":
        raise ConfigError(f"model.type must be 'mtl' for the mtl task (one encoder, a head per task in "
                          f"mtl.heads), got {model['type']!r}")
    if model["auxiliary_head"] is not None:
        raise ConfigError("model.auxiliary_head is not read by the mtl task: remove it or set model.auxiliary_head=null")
    if data["augment"]["photometric"]:
        raise ConfigError("the mtl task augments without data.augment.photometric (scale-crop and flip only); "
                          "set data.augment.photometric=false")
    kind = data["type"]
    if kind not in DATASET_TASKS:
        raise ConfigError(f"unknown data.type '{kind}' for the mtl task{did_you_mean(str(kind), DATASET_TASKS)}; "
                          f"available: {', '.join(DATASET_TASKS)}")
    check_kwargs("data.kwargs", dict(data.get("kwargs") or {}), DATASET_KWARGS[kind], owner=f"data.type '{kind}'")
    for t in tasks:
        if t not in DATASET_TASKS[kind]:
            raise ConfigError(f"data.type '{kind}' has no '{t}' labels (it has: {', '.join(DATASET_TASKS[kind])}); "
                              f"remove '{t}' from mtl.tasks")
    if kind != "synthetic" and not data.get("root"):
        raise ConfigError(f"data.root must be set for data.type '{kind}'")
    if "seg" in tasks and int(model["num_classes"]) != DATASET_CLASSES[kind]:
        raise ConfigError(f"model.num_classes is {model['num_classes']}, but data.type '{kind}' has "
                          f"{DATASET_CLASSES[kind]} segmentation classes")
    return tasks


def weighting_from(section: Mapping[str, Any], tasks: Optional[list[str]] = None) -> Any:
    """The loss weighting the section describes (``tasks`` default: ``mtl.tasks``)."""
    from .weighting import build_weighting

    tasks = tasks or list(section["tasks"])

    def own(key: str) -> Optional[dict]:  # the entries of the tasks trained (others are unused)
        given = section.get(key)
        return None if given is None else {t: v for t, v in given.items() if t in tasks}

    return build_weighting(section["weighting"], tasks, own("weights"), own("uncertainty_kinds"),
                           section["dwa_temperature"], section["dwa_interval"])
