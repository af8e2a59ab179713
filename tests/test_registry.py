"""The one Registry: decorator and call registration, lookups with hints, lazy entries; the built-in
registries hold what configs name."""
import subprocess
import sys

import pytest

import densefuse
from densefuse.errors import ConfigError
from densefuse.registry import HEADS, MODELS, PREDICTORS, TASKS, Registry, arguments


def test_register_as_decorator_and_call():
    reg = Registry("widget")

    @reg.register("a")
    def build_a():
        return "a"

    reg.register("b", len)
    assert reg.get("a") is build_a and reg.get("b") is len and reg["a"] is build_a
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg and len(reg) == 2
    assert list(reg) == ["a", "b"]


def test_unknown_name_has_hint_and_available_names():
    reg = Registry("widget")
    reg.register("upernet", object)
    reg.register("pspnet", object)
    with pytest.raises(ConfigError, match=r"^unknown widget type 'upernt' \(did you mean 'upernet'\?\); "
                                          r"available: pspnet, upernet$"):
        reg.get("upernt")
    with pytest.raises(ConfigError, match=r"^unknown model.decode_head.type 'zzz'; available: pspnet, upernet$"):
        reg.get("zzz", key="model.decode_head.type")
    with pytest.raises(ConfigError, match="available: none"):
        Registry("empty").get(None)


def test_lazy_entries_import_on_first_get():
    reg = Registry("thing")
    reg.register_lazy("ordered", "collections:OrderedDict")
    assert "ordered" in reg and reg.names() == ["ordered"]
    from collections import OrderedDict

    assert reg.get("ordered") is OrderedDict


def test_arguments_follow_kwargs_to_the_base_class():
    args = arguments(HEADS.get("psp"))
    assert {"in_index", "channels", "pool_scales", "align_corners", "eq_mode", "branch"} <= set(args)
    assert args["in_index"] == -1 and args["branch"] == "conv_bn_relu_up"
    import inspect

    assert arguments(lambda a, b=2, *c, **d: None) == {"a": inspect.Parameter.empty, "b": 2}


def test_builtin_registries():
    assert HEADS.names() == ["aspp", "fcn", "hrnet", "psp", "sep_aspp", "uper"]
    from densefuse.heads import register_head, register_predictor

    assert register_head == HEADS.register and register_predictor == PREDICTORS.register
    assert "cls_seg" in PREDICTORS
    assert {"encoder_decoder", "smp"} <= set(MODELS.names())  # tasks may add theirs (depth: gedepth)
    assert "seg" in densefuse.tasks.available_tasks()
    with pytest.raises(ConfigError, match=r"unknown model.type 'smpp' \(did you mean 'smp'"):
        densefuse.build_model({"model": {"type": "smpp"}})


def test_code_registered_task_is_found():
    from densefuse.tasks import Task, register_task, task_class

    @register_task("test_registry_task")
    class Dummy(Task):
        def build_dataset(self, cfg, split):
            return []

        def build_transform(self, cfg, train):
            return lambda b: b

        def loss(self, outputs, batch):
            return 0, {}

        def metric(self, cfg):
            return None

        def predict(self, outputs):
            return outputs

    try:
        assert task_class("test_registry_task") is Dummy and Dummy.name == "test_registry_task"
        assert "test_registry_task" in densefuse.tasks.available_tasks()
    finally:
        TASKS._items.pop("test_registry_task")
    with pytest.raises(ConfigError, match=r"unknown task 'sge' \(did you mean 'seg'\?\); available: .*seg"):
        task_class("sge")


def test_importing_densefuse_does_not_import_smp_and_heads_have_no_cycle():
    code = ("import sys, densefuse.heads.psp, densefuse.heads.uper, densefuse.heads.aspp, densefuse.heads.fcn; "
            "import densefuse; assert 'segmentation_models_pytorch' not in sys.modules; "
            "densefuse.build_model({'model': {'type': 'smp', 'num_classes': 2, 'smp': {'arch': 'FPN', "
            "'encoder_name': 'resnet18', 'kwargs': {}}, 'equalizer': {'mode': 'off'}}}); "
            "assert 'segmentation_models_pytorch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
