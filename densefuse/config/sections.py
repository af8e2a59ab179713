"""The core's config sections: every key a task shares, declared once with its default, rule and doc.

A task's own keys live in its package (``tasks/seg/config.py``, ``tasks/depth/config.py``): it subclasses
:class:`CoreConfig` (adding its own section, e.g. ``depth:``) and, where it reads more keys of a core section,
that section (``SegData(DataSection)`` adds the mmseg pipeline's keys). ``Task.config_class`` names the result.
"""
from __future__ import annotations

from typing import Any, Optional

from ..errors import ConfigError
from .schema import DEVICE_PATTERN, Origin, Rule, Section, configclass, setting, subsection

POS_INT = Rule("int", min=1)
NUMBER = Rule("number")


@configclass
class EqualizerSection(Section):
    mode: str = setting("explicit", Rule("str", choices=("off", "explicit", "fold")),
                        "`off`, `explicit` or `fold` (the paper's Algorithm 1)")
    eps: float = setting(1.0e-5, Rule("number", gt=0), "std below this marks a dead (constant) branch")


@configclass
class EncoderSection(Section):
    name: str = setting("resnet18", Rule("str"), "any timm model with `features_only`")
    out_indices: Optional[list] = setting(
        None, Rule("list", nullable=True, item=Rule("int")),
        "timm feature indices; null = the family's (ResNet `[1,2,3,4]`, Swin / Twins / ConvNeXt `[0,1,2,3]`)")
    output_stride: Optional[int] = setting(None, Rule("int", nullable=True, choices=(8, 16, 32, None)),
                                           "8 or 16 dilates resnet/convnext; swin and twins refuse it")
    pretrained: Optional[str] = setting(None, Rule("str", nullable=True),
                                        "local `.pth`/`.safetensors` file; nothing is downloaded")
    kwargs: dict = setting({}, Rule("mapping"), "extra `timm.create_model` arguments (`drop_path_rate`, ...)",
                           open=True)


@configclass
class SmpSection(Section):
    arch: str = setting("UPerNet", doc="segmentation_models_pytorch architecture for `model.type: smp`")
    encoder_name: str = setting("resnet18", doc="smp encoder name")
    kwargs: dict = setting({}, Rule("mapping"), "extra arguments of the smp model", open=True)


@configclass
class ModelSection(Section):
    type: str = setting("encoder_decoder", Rule("name"),
                        "a registered model builder: `encoder_decoder` (timm encoder + heads), `smp`, a task's own")
    num_classes: int = setting(1, POS_INT, "output channels of the predictor (the classes of a segmentation)")
    align_corners: bool = setting(False, doc="for every bilinear resize in heads and fusion")
    equalizer: EqualizerSection = subsection(EqualizerSection, "scale equalizer of every fusion site")
    encoder: EncoderSection = subsection(EncoderSection, "the timm encoder")
    decode_head: dict = setting({"type": "uper"}, Rule("mapping"),
                                "`type`, `predictor`, `branch` and the head's and predictor's arguments", open=True)
    auxiliary_head: Optional[dict] = setting(None, Rule("mapping", nullable=True),
                                             "same as decode_head, plus `loss_weight`", open=True)
    smp: SmpSection = subsection(SmpSection, "the smp model of `model.type: smp`")
    sync_bn: Optional[bool] = setting(None, Rule("bool", nullable=True),
                                      "null: SyncBatchNorm when training on more than one process")


@configclass
class AugmentSection(Section):
    scale_range: list = setting([0.5, 2.0], Rule("list", length=2, item=Rule("number", gt=0)),
                                "random rescale range of the batch pipeline")
    flip: bool = setting(True, doc="random horizontal flip")
    photometric: bool = setting(False, doc="mmseg's photometric distortion, batched on the training device")

    def check(self, origin: Origin) -> None:
        low, high = self.scale_range
        if not float(low) <= float(high):
            raise ConfigError(f"data.augment.scale_range must be [low, high] with 0 < low <= high, "
                              f"got {list(self.scale_range)}")


@configclass
class DataSection(Section):
    type: str = setting("synthetic", Rule("name"), "dataset name (the task lists its datasets)")
    root: Optional[str] = setting(None, Rule("str", nullable=True), "dataset root in its official layout")
    train_split: str = setting("train", doc="split the model trains on")
    val_split: str = setting("val", doc="split evaluated every `train.val_interval`")
    crop_size: list = setting([128, 128], Rule("list", length=2, item=POS_INT), "training crop (H, W)")
    mean: list = setting([123.675, 116.28, 103.53], Rule("list", length=3, item=NUMBER),
                         "input normalization mean (0-255 scale)")
    std: list = setting([58.395, 57.12, 57.375], Rule("list", length=3, item=Rule("number", gt=0)),
                        "input normalization std (0-255 scale)")
    num_workers: int = setting(0, Rule("int", min=0), "DataLoader workers")
    kwargs: dict = setting({}, Rule("mapping"), "dataset-specific arguments (synthetic `num_train`, `size`, ...)",
                           open=True)
    augment: AugmentSection = subsection(AugmentSection, "batch augmentation on the training device")
    verify: Optional[bool] = setting(None, Rule("bool", nullable=True),
                                     "read every sample before training; null: datasets under 2000 samples")
    skip_bad: bool = setting(False, Rule("bool"),
                             "replace an unreadable sample by the next readable one (deterministic)")


@configclass
class TrainSection(Section):
    iters: int = setting(1000, POS_INT, "optimizer steps of the run")
    batch_size: int = setting(8, POS_INT, "images per step and process")
    val_interval: int = setting(500, POS_INT, "evaluate every N iterations")
    log_interval: int = setting(20, POS_INT, "log every N iterations")
    ckpt_interval: int = setting(500, POS_INT, "save a checkpoint every N iterations")
    amp: str = setting("off", Rule("str", choices=("off", "fp16", "bf16")), "`off`, `fp16` (CUDA) or `bf16`")
    grad_clip: Optional[float] = setting(None, Rule("number", nullable=True, gt=0), "max gradient norm, or null")
    accum_steps: int = setting(1, POS_INT, "micro-batches of batch_size per optimizer step")
    channels_last: bool = setting(False, doc="channels-last images and weights")
    compile: Any = setting(False, Rule("any"), "torch.compile: false, true (inductor) or a backend name")
    keep_last: int = setting(1, Rule("int", min=0), "`iter_<N>.pth` checkpoints kept besides `latest.pth`")
    tensorboard: bool = setting(False, doc="also write TensorBoard scalars")
    dist_timeout: float = setting(1800, Rule("number", gt=0), "seconds to wait for the other processes")
    nonfinite: str = setting("stop", Rule("str", choices=("stop", "skip")),
                             "inf/nan loss or gradient norm: `stop` or `skip` the step")
    nonfinite_limit: int = setting(10, Rule("int", min=0), "with skip: stop once more steps than this were dropped")


_CUSTOM_MULTS = ("lr_mult", "decay_mult")
_LAYER_DECAY_KEYS = ("rate", "num_layers", "family")


@configclass
class ParamwiseSection(Section):
    custom_keys: dict = setting({}, Rule("mapping"), "name substring -> `{lr_mult, decay_mult}`, longest first",
                                open=True)
    norm_decay_mult: Optional[float] = setting(None, Rule("number", nullable=True, min=0), "norm layers' decay")
    bias_decay_mult: Optional[float] = setting(None, Rule("number", nullable=True, min=0), "biases' decay")
    bias_lr_mult: Optional[float] = setting(None, Rule("number", nullable=True, min=0), "biases' learning rate")
    dwconv_decay_mult: Optional[float] = setting(None, Rule("number", nullable=True, min=0),
                                                 "depthwise convs' decay")
    layer_decay: Optional[dict] = setting(None, Rule("mapping", nullable=True),
                                          "`{rate, num_layers, family: convnext}` stage-wise lr decay", open=True)

    def check(self, origin: Origin) -> None:
        where = f"{origin('optim.paramwise')}: " if origin("optim.paramwise") else ""
        for key, mults in (self.custom_keys or {}).items():
            if not isinstance(mults, dict) or any(m not in _CUSTOM_MULTS for m in mults):
                raise ConfigError(f"{where}optim.paramwise.custom_keys.{key} must be a mapping with lr_mult and/or "
                                  f"decay_mult, got {mults!r}")
        ld = self.layer_decay
        if ld is None:
            return
        if set(ld) - set(_LAYER_DECAY_KEYS) or "rate" not in ld or "num_layers" not in ld:
            raise ConfigError(f"{where}optim.paramwise.layer_decay must be {{rate, num_layers, family: convnext}}, "
                              f"got {ld!r}")
        if ld.get("family", "convnext") != "convnext":
            raise ConfigError(f"{where}optim.paramwise.layer_decay.family: only 'convnext' (mmseg stage_wise) is "
                              f"supported, got {ld.get('family')!r}")
        if not 0 < float(ld["rate"]) <= 1 or int(ld["num_layers"]) < 1:
            raise ConfigError(f"{where}optim.paramwise.layer_decay needs 0 < rate <= 1 and num_layers >= 1, "
                              f"got {dict(ld)}")

    def active(self) -> bool:
        """Whether any rule is set; the all-default section keeps the plain ``norm_decay`` grouping."""
        return any(v for v in self.values() if v is not None)


@configclass
class OptimSection(Section):
    type: str = setting("adamw", Rule("str", choices=("adamw", "sgd"), ignore_case=True),
                        "`adamw` or `sgd` (any letter case)")
    lr: float = setting(1.0e-3, Rule("number", gt=0), "base learning rate")
    weight_decay: float = setting(0.01, Rule("number", min=0), "as in torch")
    momentum: float = setting(0.9, Rule("number", min=0), "SGD momentum")
    betas: list = setting([0.9, 0.999], Rule("list", length=2, item=Rule("number", min=0, lt=1)), "AdamW betas")
    norm_decay: bool = setting(True, doc="false removes weight decay from norm parameters and biases")
    impl: str = setting("auto", Rule("str", choices=("auto", "fused", "foreach", "for-loop")),
                        "torch's update kernel: `auto` (fused where every parameter's device has it), `fused`, "
                        "`foreach` or `for-loop` (torch's CPU default); resume keeps the checkpoint's")
    paramwise: ParamwiseSection = subsection(ParamwiseSection, "mmseg's paramwise_cfg; any rule set replaces norm_decay")


@configclass
class ScheduleSection(Section):
    type: str = setting("poly", Rule("str", choices=("poly", "constant", "cosine")), "`poly`, `constant` or `cosine`")
    power: float = setting(1.0, Rule("number", min=0), "poly: `lr = min_lr + (lr0 - min_lr)(1 - t/T)^power`")
    min_lr: float = setting(0.0, Rule("number", min=0), "final learning rate")
    warmup_iters: int = setting(0, Rule("int", min=0), "linear warmup iterations")
    warmup_ratio: float = setting(1.0e-6, Rule("number", gt=0), "warmup starts at `ratio * lr`")


@configclass
class CalibrationSection(Section):
    num_images: Optional[int] = setting(64, Rule("int", nullable=True, min=1),
                                        "images for calibration; null = the whole training set (Algorithm 1)")
    batch_size: int = setting(8, Rule("int", min=2), "calibration batches (BN runs in train mode, so >= 2)")


@configclass
class TTASection(Section):
    flip: bool = setting(False, Rule("bool"), "add horizontally flipped views")
    scales: Optional[list] = setting(None, Rule("list", nullable=True, item=Rule("number", gt=0)),
                                     "scale ratios, e.g. mmseg's `[0.5, 0.75, 1.0, 1.25, 1.5, 1.75]`")


@configclass
class EvalSection(Section):
    batch_size: int = setting(1, POS_INT, "images per evaluation batch (keep 1 for datasets of mixed sizes)")
    mode: str = setting("whole", Rule("str", choices=("whole", "slide")), "`whole` or `slide` inference")
    crop_size: Optional[list] = setting(None, Rule("list", nullable=True, length=2, item=POS_INT), "slide window [h, w]")
    stride: Optional[list] = setting(None, Rule("list", nullable=True, length=2, item=POS_INT), "slide stride [h, w]")
    slide_batch: int = setting(8, POS_INT, "slide windows per forward call")
    tta: TTASection = subsection(TTASection, "test-time augmentation, views merged by the task")

    def check(self, origin: Origin) -> None:
        where = f"{origin('eval')}: " if origin("eval") else ""
        if self.mode != "slide":
            return
        if self.crop_size is None or self.stride is None:
            raise ConfigError(f"{where}eval.mode 'slide' needs eval.crop_size and eval.stride")
        if any(s > c for s, c in zip(self.stride, self.crop_size)):
            raise ConfigError(f"{where}eval.stride {list(self.stride)} larger than eval.crop_size "
                              f"{list(self.crop_size)} would skip pixels")


@configclass
class CoreConfig(Section):
    """A run's config: what every task shares. A task's ``config_class`` subclasses it."""

    task: str = setting("seg", Rule("name"), "task plugin (entry-point group `densefuse.tasks`)")
    name: Optional[str] = setting(None, Rule("str", nullable=True), "run name (default: the config file's stem)")
    seed: int = setting(0, Rule("int", min=0), "seeds Python, NumPy, torch and the samplers")
    device: str = setting("auto", Rule("str", pattern=DEVICE_PATTERN),
                          "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`, `mps`")
    work_dir: Optional[str] = setting(None, Rule("str", nullable=True), "root of run directories (null: `work_dirs`)")
    model: ModelSection = subsection(ModelSection, "what is built")
    data: DataSection = subsection(DataSection, "what it trains and evaluates on")
    train: TrainSection = subsection(TrainSection, "the training loop")
    optim: OptimSection = subsection(OptimSection, "the optimizer")
    schedule: ScheduleSection = subsection(ScheduleSection, "the learning-rate schedule")
    calibration: CalibrationSection = subsection(CalibrationSection, "scale-equalizer calibration before step 0")
    eval: EvalSection = subsection(EvalSection, "inference during evaluation")

#: the core's defaults as a plain tree (derived from the declarations above)
DEFAULTS = CoreConfig.defaults()
