"""Typed experiment config: the single source of defaults, plus loading, merging and validation.

A run's config is built as ``defaults <- experiment YAML <- key=value overrides``. The dataclasses
below hold every default; YAML files carry only what differs. Struct mode makes an unknown key an
error, and OmegaConf checks types, so ``data.batch_size=abc`` fails naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from h3de.errors import ConfigError
from h3de.io_utils import atomic_write

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "UNetConfig",
    "ModelConfig",
    "LossConfig",
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


@dataclass
class DataConfig:
    """Where the data is and how volumes become network inputs and heatmap targets."""

    root: str = "data/phantom"  # folder holding the manifest
    manifest: str = "dataset.json"  # relative to root
    spacing_mm: list[float] = field(default_factory=lambda: [4.0, 4.0, 4.0])  # resampling target
    patch_size: list[int] = field(default_factory=lambda: [48, 48, 48])  # voxels, centre pad/crop
    normalize: str = "zscore"  # zscore | percentile
    heatmap_sigma: float = 2.0  # Gaussian target sigma in voxels of the resampled grid
    batch_size: int = 4  # global batch, divided over devices
    num_workers: int = 0
    cache_rate: float = 1.0  # share of cases whose deterministic preprocessing is cached in memory
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
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-5
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | exponential | constant
    gamma: float = 0.98  # exponential: per-epoch decay
    warmup_epochs: int = 0  # linear warm-up before the schedule


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that experiments change."""

    max_epochs: int = 30
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
    deterministic: bool = False
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


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    output_dir: str = "runs"  # each run writes to output_dir/name/<timestamp>
    sdr_radii_mm: list[float] = field(default_factory=lambda: [2.0, 2.5, 3.0, 4.0])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_NAMED_SECTIONS = ("model", "loss", "optim", "logger")  # sections chosen by their `name` field

_CHOICES = {
    "data.normalize": ("zscore", "percentile"),
    "loss.name": ("spatial_ce", "weighted_mse", "ball_ohnm", "anchor"),
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
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {_first_line(e)}") from None
        cfg = _merge(cfg, dot, f"override '{item}'")
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


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
    for key in ("data.spacing_mm", "data.patch_size", "data.augment.rotate_deg"):
        value = OmegaConf.select(cfg, key)
        if len(value) != 3:
            raise ConfigError(f"{key} must have 3 values (one per axis), got {list(value)}")
    if any(s <= 0 for s in cfg.data.spacing_mm):
        raise ConfigError(f"data.spacing_mm must be positive, got {list(cfg.data.spacing_mm)}")
    if any(p < 8 for p in cfg.data.patch_size):
        raise ConfigError(f"data.patch_size must be at least 8 voxels per axis, got {list(cfg.data.patch_size)}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.heatmap_sigma": cfg.data.heatmap_sigma,
        "optim.lr": cfg.optim.lr,
        "trainer.max_epochs": cfg.trainer.max_epochs,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key in ("data.augment.affine_prob", "data.augment.flip_prob", "data.augment.intensity_prob"):
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {value}")
    if not 0.0 <= cfg.data.cache_rate <= 1.0:
        raise ConfigError(f"data.cache_rate must lie in [0, 1], got {cfg.data.cache_rate}")
    if any(r <= 0 for r in cfg.sdr_radii_mm):
        raise ConfigError(f"sdr_radii_mm must be positive, got {list(cfg.sdr_radii_mm)}")


def to_container(cfg: DictConfig) -> dict:
    """Plain, resolved dict of the config (for checkpoints and loggers)."""
    return OmegaConf.to_container(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file, then rename)."""
    atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True))
