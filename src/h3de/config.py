"""Typed experiment config: the single source of defaults, plus loading, merging and validation.

A run's config is built as ``defaults <- experiment YAML <- key=value overrides``. The dataclasses
below hold every default; YAML files carry only what differs. Struct mode makes an unknown key an
error, and OmegaConf checks types, so ``data.batch_size=abc`` fails naming the key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import StringNode

from h3de.errors import ConfigError
from h3de.io_utils import atomic_write

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "UNetConfig",
    "ModelConfig",
    "LossConfig",
    "DetectionConfig",
    "LocalStageConfig",
    "OptimConfig",
    "TrainerConfig",
    "LoggerConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "to_container",
    "save_config",
]


@dataclass
class AugmentConfig:
    """Training-time augmentation; every spatial one moves the landmarks with the image."""

    enabled: bool = True
    affine_prob: float = 0.8
    rotate_deg: list[float] = field(default_factory=lambda: [10.0, 10.0, 10.0])  # +- degrees per axis
    scale: float = 0.1  # +- relative zoom
    translate_mm: float = 8.0  # +- millimetres per axis
    flip_prob: float = 0.5  # left-right flip; swaps the labels of the manifest's mirrored pairs
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1  # +- relative scale of the normalised intensities
    intensity_shift: float = 0.1  # +- shift of the normalised intensities
    noise_std: float = 0.05  # std of additive Gaussian noise (applied with intensity_prob)
    # Elastic warp (cubic B-spline field) that moves the landmarks with the anatomy. Off by default (0.0): the
    # chain is then unchanged. A field whose gradient could reach 0.9 (magnitude above about spacing / 5) is
    # scaled down, so the warp never folds.
    elastic_prob: float = 0.0
    elastic_magnitude_mm: float = 6.0  # control-point displacements uniform in +- this, per axis
    elastic_spacing_mm: float = 40.0  # between control points: larger is smoother
    # MRI bias field (MONAI RandBiasFieldd on the global image, not the local patches): the image times exp of a
    # Legendre polynomial of degree bias_field_degree whose coefficients are uniform in +-bias_field_coeff. Off (0.0)
    # by default, like the contrast below: the chain is then unchanged.
    bias_field_prob: float = 0.0
    bias_field_coeff: float = 0.1
    bias_field_degree: int = 3
    # Contrast (MONAI RandAdjustContrastd): intensities rescaled to [0, 1] over their range, raised to a power
    # uniform in contrast_gamma, and scaled back; on the global image and the local patches.
    contrast_prob: float = 0.0
    contrast_gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])


@dataclass
class DataConfig:
    """Where the data is and how volumes become network inputs and heatmap targets."""

    root: str = "data/phantom"  # folder holding the manifest
    manifest: str = "dataset.json"  # relative to root
    spacing_mm: list[float] = field(default_factory=lambda: [4.0, 4.0, 4.0])  # resampling target
    patch_size: list[int] = field(default_factory=lambda: [48, 48, 48])  # voxels, centre pad/crop
    normalize: str = "zscore"  # zscore | percentile (MRI) | window (CT)
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # percentile: these map to 0 and 1, clipped
    window: list[float] | None = None  # window: [lo, hi] in image units (CT: HU) clipped and mapped to [0, 1]
    heatmap_sigma: float = 2.0  # Gaussian target sigma in voxels of the resampled grid
    batch_size: int = 4  # global batch, divided over devices
    num_workers: int = 0
    cache_rate: float = 1.0  # share of cases whose deterministic preprocessing is cached in memory
    # training samples drawn per epoch (shuffled repeats of the train split; over all devices). null: one pass over
    # the split. A fixed number keeps the optimiser steps per epoch (samples / batch_size) independent of the data size.
    samples_per_epoch: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class UNetConfig:
    """MONAI residual U-Net (baseline heatmap regressor)."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    norm: str = "instance"
    dropout: float = 0.0


@dataclass
class SwinUNETRConfig:
    """MONAI SwinUNETR (transformer-CNN hybrid comparison network)."""

    feature_size: int = 24
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    use_v2: bool = False


@dataclass
class H3DENetConfig:
    """H3DE-Net (read by both ``h3de_net`` and ``h3de_net_anchor``); sizes left null take the preset's."""

    preset: str = "reference"  # reference | tiny
    widths: list[int] | None = None  # 4 encoder stages
    depths: list[int] | None = None
    topk: list[int] | None = None
    decoder_widths: list[int] | None = None  # 5 decoder levels, strides 16, 8, 4, 2, 1
    head_dim: int = 8
    attention_scale: str | None = None  # V-BRA softmax scale: head (head_dim^-0.5) | width (width^-0.5); null: preset's
    region_grid: list[int] | None = field(default_factory=lambda: [4, 4, 2])  # fixed region count per axis
    region_size: list[int] | None = None  # or fixed tokens per region per axis (set region_grid to null)
    mlp_ratio: float = 4.0
    attention: bool = True  # false: the "CNN only" ablation
    lce_kernel: int = 5  # V-BRA local context enhancement (0 disables)
    upsample: str = "sr"  # sr (super-resolution block) | trilinear
    fusion: str = "concat"  # Feature Fusion Module: concat | sum | none
    full_res_levels: int = 2  # input-skip decoder levels run (2: full resolution; fewer: upsampled heatmaps)
    anchor_sizes: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25])  # anchor head, in cells
    norm: str = "group"  # decoder normalisation: group | instance | batch | layer
    recompute_full_res: bool = True  # training: recompute the stride-1 decoder level in backward (less memory)


@dataclass
class ModelConfig:
    """Network chosen by registry name; each network reads its own sub-config."""

    name: str = "unet"
    unet: UNetConfig = field(default_factory=UNetConfig)
    swin_unetr: SwinUNETRConfig = field(default_factory=SwinUNETRConfig)
    h3de_net: H3DENetConfig = field(default_factory=H3DENetConfig)


@dataclass
class LossConfig:
    """Heatmap loss, masked by landmark visibility."""

    name: str = "spatial_ce"  # heatmap networks: spatial_ce | weighted_mse | ball_ohnm; anchor networks: anchor
    foreground_weight: float = 20.0  # weighted_mse: extra weight where the target exceeds 0.1
    target_scale: float = 1.0  # weighted_mse: peak value of the Gaussian target
    ball_radius: float = 3.0  # ball_ohnm: target ball radius in voxels
    negative_ratio: float = 3.0  # ball_ohnm: mined negatives per positive voxel
    hard_negatives: int = 15  # anchor, ball_ohnm: mined negatives per absent landmark and sample
    offset_weight: float = 1.0  # anchor: weight of the smooth-L1 offset loss
    top_candidates: int = 15  # anchor: candidates voted on per landmark when decoding


@dataclass
class DetectionConfig:
    """How a model finds landmarks in a whole scan; validation, evaluate and predict all use it.

    - ``whole``: one network over the whole volume resampled to ``data.spacing_mm`` (padded to at least
      ``data.patch_size``); trained on centre crops of that size.
    - ``sliding_window``: trained on random ``data.patch_size`` patches at ``data.spacing_mm``, a share of them
      placed around a landmark; predicted with MONAI's sliding-window inferer (Gaussian-weighted overlap). Any
      heatmap loss: its outputs compare across windows (spatial_ce's voxel logits are each measured against the
      landmark's learned absent logit, which a window without the landmark is trained to exceed everywhere).
    - ``coarse_to_fine``: the ``whole`` model as the global stage, then the ``local`` stage refines each landmark
      on a fine patch centred on its coarse estimate.
    """

    mode: str = "whole"  # whole | sliding_window | coarse_to_fine
    overlap: float = 0.5  # sliding_window: overlap of neighbouring windows, in [0, 1)
    sw_batch_size: int = 2  # sliding_window: windows per network call
    landmark_patch_prob: float = 0.5  # sliding_window training: share of patches that contain a landmark
    max_heatmap_gib: float = 1.0  # sliding_window: landmarks are decoded in chunks whose whole-volume maps fit this


@dataclass
class LocalStageConfig:
    """The local stage of ``detection.mode=coarse_to_fine``: one network (``model``) for all landmarks.

    It sees a fine patch around one landmark's estimate. Training patches are centred on the true landmark plus a
    uniform random offset of up to ``offset_mm`` per axis (at least the global stage's error, so it learns to
    correct it), with a random rotation. Two designs, compared in ``benchmarks/fine_accuracy.md``:

    - ``shared``: the patch in, one heatmap per landmark out; the patch's own landmark is read, and training
      supervises every landmark that falls in a patch.
    - ``conditioned``: the patch plus L gated copies of it (the copy in the asked landmark's channel, zeros in the
      others) in, that landmark's one heatmap out; training supervises each patch on the landmark it was drawn for only.
    """

    design: str = "shared"  # shared | conditioned
    spacing_mm: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    heatmap_sigma: float = 1.5  # voxels of the fine grid
    offset_mm: float = 8.0  # +- per axis around the true landmark (training only)
    rotate_deg: float = 10.0  # +- random rotation of the patch about each axis (training only)
    scale: float = 0.0  # +- fraction of random stretch of the patch along each of its axes (training only)
    loss_weight: float = 1.0  # weight of the local loss beside the global one
    patches_per_sample: int | None = None  # training patches per sample (null: one per landmark); bounds memory
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="unet"))
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-5
    momentum: float = 0.9  # sgd only
    # The schedule steps every optimiser step over the run's step budget (trainer.max_epochs x steps per epoch, or
    # trainer.max_steps if that is less). A time budget (trainer.max_time) cannot tell the schedule its length: the
    # cosine still spans max_epochs/max_steps and is cut wherever the time runs out.
    scheduler: str = "cosine"  # cosine | exponential | constant
    gamma: float = 0.98  # exponential: decay per epoch (applied as gamma ** (1 / steps per epoch) every step)
    warmup_epochs: int = 0  # linear warm-up before the schedule, in epochs (converted to optimiser steps)


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that experiments change."""

    max_epochs: int = 30
    max_steps: int = -1  # stop after this many optimiser steps (-1: no limit); the first budget reached ends the run
    max_time: str | None = None  # wall-clock budget "DD:HH:MM:SS" (null: none); see optim for the LR schedule
    accelerator: str = "auto"
    devices: Any = 1  # int, list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    gradient_clip_val: float = 0.0
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 5
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    fast_dev_run: bool = False
    # true: deterministic algorithms only (Lightning sets CUBLAS_WORKSPACE_CONFIG; an operation without a deterministic
    # implementation is an error); "warn": the same, but such an operation only warns
    deterministic: Any = False
    num_sanity_val_steps: int = 2
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    """Experiment logger. metrics.csv is written in the run directory unless name is 'none'."""

    name: str = "wandb"  # wandb | csv | none
    project: str = "h3de"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    connect_timeout_s: float = 10.0  # online: how long the W&B server may take to answer before the run starts
    image_every_n_epochs: int = 5  # W&B: slices of a val case with landmarks and heatmap every N epochs (0 = never)
    log_checkpoint: bool = False  # W&B: the best checkpoint as a model artifact at the end of training


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs"  # each run writes to output_dir/name/<timestamp>
    sdr_radii_mm: list[float] = field(default_factory=lambda: [2.0, 2.5, 3.0, 4.0])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    local: LocalStageConfig = field(default_factory=LocalStageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_NAMED_SECTIONS = ("model", "loss", "optim", "logger")  # sections chosen by their `name` field

_CHOICES = {
    "data.normalize": ("zscore", "percentile", "window"),
    "loss.name": ("spatial_ce", "weighted_mse", "ball_ohnm", "anchor"),
    "detection.mode": ("whole", "sliding_window", "coarse_to_fine"),
    "local.loss.name": ("spatial_ce", "weighted_mse", "ball_ohnm"),
    "local.design": ("shared", "conditioned"),
    "optim.name": ("adamw", "adam", "sgd"),
    "optim.scheduler": ("cosine", "exponential", "constant"),
    "trainer.precision": ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true"),
    "logger.name": ("wandb", "csv", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
}


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: invalid config key '{key}': {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__


def _file_layers(path: Path, seen: list[Path]) -> list[tuple[Path, DictConfig]]:
    """The YAML file and the files it builds on (``base: other.yaml``, relative to it), base first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle ({' -> '.join(map(str, seen))})")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in many classes
        raise ConfigError(f"{path}: not valid YAML: {_first_line(e)}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    base = layer.pop("base", None)
    if base is None:
        return [(path, layer)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be the path of another experiment YAML, got {base!r}")
    return [*_file_layers(path.parent / base, [*seen, path.resolve()]), (path, layer)]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Return the resolved, validated config: defaults <- YAML file <- ``key=value`` overrides.

    A YAML file may build on another with ``base: other.yaml`` (a path relative to the file); its own
    values win. The run is named after the file unless a file sets ``name``.

    ``model=X``, ``loss=X``, ``optim=X`` and ``logger=X`` are shorthand for ``<section>.name=X``.

    Raises:
        ConfigError: on a missing/unparsable file, an unknown key, a wrong type or a bad value.
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        path = Path(path)
        named = False
        for layer_path, layer in _file_layers(path, []):
            cfg = _merge(cfg, layer, str(layer_path))
            named = named or "name" in layer
        if not named:
            cfg.name = path.stem
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key in _NAMED_SECTIONS:
            item = f"{key}.name={value}"  # shorthand: logger=csv means logger.name=csv
        try:
            dot = _string_override(cfg, item) or OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"override '{item}': {_first_line(e)}") from None
        cfg = _merge(cfg, dot, f"override '{item}'")
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def _string_override(cfg: DictConfig, item: str) -> DictConfig | None:
    """``key=value`` for a key typed ``str`` or ``list[str]``, its value read as text (YAML would read ``on``, ``no``
    and ``1e3`` as True, False and 1000.0); ``null`` is None where the key may be null. None for other keys."""
    key, value = item.split("=", 1)
    node: Any = cfg
    for part in key.split("."):
        node = node._get_node(part) if isinstance(node, DictConfig) and part in node else None
    is_text = isinstance(node, StringNode)
    if not is_text and not (isinstance(node, ListConfig) and node._metadata.element_type is str):
        return None
    parsed = yaml.load(value, Loader=yaml.BaseLoader) if value.strip() else value  # every scalar a string
    if parsed in ("null", "~") and node._is_optional():
        parsed = None
    return OmegaConf.create(_nested(key.split("."), parsed))


def _nested(parts: list[str], value: Any) -> dict:
    return {parts[0]: _nested(parts[1:], value) if len(parts) > 1 else value}


def config_from_dict(values: dict) -> DictConfig:
    """Rebuild a validated config from a plain dict (e.g. the one saved in a checkpoint)."""
    cfg = _merge(OmegaConf.structured(ExperimentConfig), values, "saved config")
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check values that types alone cannot (choices, lengths, ranges)."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    from h3de.networks import check_network_input, network_params, network_spec  # late: imports torch

    spec = network_spec(cfg.model.name)
    check_network_input(cfg.model.name, network_params(cfg.model), cfg.data.patch_size)
    if (spec.output == "anchor") != (cfg.loss.name == "anchor"):
        fits = "anchor" if spec.output == "anchor" else "spatial_ce, weighted_mse or ball_ohnm"
        raise ConfigError(
            f"loss.name='{cfg.loss.name}' does not fit model.name='{cfg.model.name}' ({spec.output} output): "
            f"use loss.name={fits}"
        )
    for key in (
        "data.spacing_mm",
        "data.patch_size",
        "data.augment.rotate_deg",
        "local.spacing_mm",
        "local.patch_size",
    ):
        value = OmegaConf.select(cfg, key)
        if len(value) != 3:
            raise ConfigError(f"{key} must have 3 values (one per axis), got {list(value)}")
    _validate_detection(cfg)
    if any(s <= 0 for s in cfg.data.spacing_mm):
        raise ConfigError(f"data.spacing_mm must be positive, got {list(cfg.data.spacing_mm)}")
    if any(p < 8 for p in cfg.data.patch_size):
        raise ConfigError(f"data.patch_size must be at least 8 voxels per axis, got {list(cfg.data.patch_size)}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.heatmap_sigma": cfg.data.heatmap_sigma,
        "data.augment.elastic_spacing_mm": cfg.data.augment.elastic_spacing_mm,
        "optim.lr": cfg.optim.lr,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "trainer.accumulate_grad_batches": cfg.trainer.accumulate_grad_batches,
        "trainer.check_val_every_n_epoch": cfg.trainer.check_val_every_n_epoch,
        "trainer.log_every_n_steps": cfg.trainer.log_every_n_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.trainer.gradient_clip_val < 0:  # Lightning takes a negative value silently and clips nothing
        raise ConfigError(f"trainer.gradient_clip_val must be 0 (off) or positive, got {cfg.trainer.gradient_clip_val}")
    probabilities = ("affine_prob", "flip_prob", "intensity_prob", "elastic_prob", "bias_field_prob", "contrast_prob")
    for key in (f"data.augment.{name}" for name in probabilities):
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {value}")
    if cfg.data.augment.elastic_magnitude_mm < 0:
        raise ConfigError(
            f"data.augment.elastic_magnitude_mm must be non-negative, got {cfg.data.augment.elastic_magnitude_mm}"
        )
    _validate_intensity(cfg)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be 0 (no loader processes) or more, got {cfg.data.num_workers}")
    if not 0.0 <= cfg.data.cache_rate <= 1.0:
        raise ConfigError(f"data.cache_rate must lie in [0, 1], got {cfg.data.cache_rate}")
    if cfg.data.samples_per_epoch is not None and cfg.data.samples_per_epoch <= 0:
        raise ConfigError(f"data.samples_per_epoch must be positive or null, got {cfg.data.samples_per_epoch}")
    if cfg.trainer.deterministic not in (True, False, "warn"):
        raise ConfigError(f"trainer.deterministic must be true, false or warn, got {cfg.trainer.deterministic!r}")
    if cfg.trainer.max_steps == 0 or cfg.trainer.max_steps < -1:
        raise ConfigError(f"trainer.max_steps must be positive or -1 (no limit), got {cfg.trainer.max_steps}")
    max_time = cfg.trainer.max_time
    if max_time is not None and not _is_duration(max_time):
        hint = " (YAML reads an unquoted 1:00:00:00 as a base-60 number: quote it or write 01:00:00:00)"
        raise ConfigError(
            f"trainer.max_time={max_time!r} is not a positive duration 'DD:HH:MM:SS'" + hint * max_time.isdigit()
        )
    if any(r <= 0 for r in cfg.sdr_radii_mm):
        raise ConfigError(f"sdr_radii_mm must be positive, got {list(cfg.sdr_radii_mm)}")
    if cfg.logger.connect_timeout_s <= 0:
        raise ConfigError(f"logger.connect_timeout_s must be positive, got {cfg.logger.connect_timeout_s}")
    if cfg.logger.image_every_n_epochs < 0:
        raise ConfigError(
            f"logger.image_every_n_epochs must be 0 (never) or positive, got {cfg.logger.image_every_n_epochs}"
        )


def _validate_intensity(cfg: DictConfig) -> None:
    """Normalisation and intensity augmentation: percentiles, CT window, bias field, contrast."""
    data, aug = cfg.data, cfg.data.augment
    percentiles = list(data.percentiles)
    if len(percentiles) != 2 or not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
        raise ConfigError(f"data.percentiles must be [lower, upper] with 0 <= lower < upper <= 100, got {percentiles}")
    if data.normalize == "window":
        window = data.window
        if window is None or len(window) != 2 or not all(math.isfinite(v) for v in window) or window[0] >= window[1]:
            found = None if window is None else list(window)
            raise ConfigError(f"data.normalize=window needs data.window=[lo, hi] with lo < hi (CT: HU), got {found}")
    elif data.window is not None:
        raise ConfigError(
            f"data.window={list(data.window)} is only read by data.normalize=window, not '{data.normalize}': "
            "set data.normalize=window or data.window=null"
        )
    if aug.bias_field_coeff < 0 or aug.bias_field_degree < 1:
        raise ConfigError(
            "data.augment.bias_field_coeff must be non-negative and data.augment.bias_field_degree at least 1, got "
            f"{aug.bias_field_coeff} and {aug.bias_field_degree}"
        )
    gamma = list(aug.contrast_gamma)
    if len(gamma) != 2 or not 0.0 < gamma[0] <= gamma[1]:
        raise ConfigError(f"data.augment.contrast_gamma must be [low, high] with 0 < low <= high, got {gamma}")


def _validate_detection(cfg: DictConfig) -> None:
    """Inference-mode rules: ranges of the detection settings; the local stage a heatmap network that fits its patch."""
    from h3de.networks import check_network_input, network_params, network_spec

    mode = cfg.detection.mode
    if not 0.0 <= cfg.detection.overlap < 1.0:
        raise ConfigError(f"detection.overlap must lie in [0, 1), got {cfg.detection.overlap}")
    if not 0.0 <= cfg.detection.landmark_patch_prob <= 1.0:
        raise ConfigError(f"detection.landmark_patch_prob must lie in [0, 1], got {cfg.detection.landmark_patch_prob}")
    for key in ("detection.sw_batch_size", "detection.max_heatmap_gib", "local.heatmap_sigma", "local.loss_weight"):
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    if cfg.local.patches_per_sample is not None and cfg.local.patches_per_sample < 1:
        raise ConfigError(f"local.patches_per_sample must be positive or null, got {cfg.local.patches_per_sample}")
    if not 0.0 <= cfg.local.scale < 1.0:
        raise ConfigError(f"local.scale must lie in [0, 1), got {cfg.local.scale}")
    for key in ("local.offset_mm", "local.rotate_deg"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must not be negative, got {OmegaConf.select(cfg, key)}")
    if mode == "sliding_window" and network_spec(cfg.model.name).output != "heatmap":
        raise ConfigError(
            f"detection.mode=sliding_window needs a heatmap network, and model.name='{cfg.model.name}' gives anchor "
            "maps (windows are blended per landmark map): use detection.mode=whole or coarse_to_fine"
        )
    if mode != "coarse_to_fine":
        return
    local = cfg.local
    if network_spec(local.model.name).output != "heatmap":
        raise ConfigError(f"local.model.name='{local.model.name}' must be a heatmap network (the local stage)")
    if any(s <= 0 for s in local.spacing_mm) or any(p < 8 for p in local.patch_size):
        raise ConfigError(
            f"local.spacing_mm must be positive and local.patch_size at least 8 voxels per axis, got "
            f"{list(local.spacing_mm)} and {list(local.patch_size)}"
        )
    try:
        check_network_input(local.model.name, network_params(local.model), local.patch_size)
    except ConfigError as e:
        message = str(e).replace("data.patch_size", "local.patch_size").replace("model.", "local.model.", 1)
        raise ConfigError(f"local stage: {message}") from None


def _is_duration(text: str) -> bool:
    """Whether ``text`` is a positive ``DD:HH:MM:SS`` duration, the string ``lightning.Trainer(max_time=)`` reads."""
    match = re.fullmatch(r"(\d+):([01]\d|2[0-3]):([0-5]\d):([0-5]\d)", text, flags=re.ASCII)
    return match is not None and any(int(part) for part in match.groups())


def to_container(cfg: DictConfig) -> dict:
    """Plain, resolved dict of the config (for checkpoints and loggers)."""
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file, then rename)."""
    atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True))
