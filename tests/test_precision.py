"""Precision from config: refused where the device cannot run it; bf16-mixed trains H3DE-Net on the CPU."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from h3de.config import TrainerConfig, load_config
from h3de.errors import ConfigError
from h3de.precision import check_precision
from h3de.train import train


def _trainer(**values):
    return OmegaConf.merge(OmegaConf.structured(TrainerConfig), values)


def test_cpu_runs_32_and_bf16_and_refuses_16_mixed():
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        check_precision(_trainer(accelerator="cpu", precision=precision))
    with pytest.raises(ConfigError, match="16-mixed needs a CUDA GPU.*on the CPU use bf16-mixed or 32-true"):
        check_precision(_trainer(accelerator="cpu", precision="16-mixed"))


def test_a_gpu_without_bf16_refuses_bf16(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda device=None: "Tesla V100")
    check_precision(_trainer(accelerator="gpu", precision="16-mixed"))
    for precision in ("bf16-mixed", "bf16-true"):
        with pytest.raises(ConfigError, match=f"{precision} needs a GPU with bfloat16 support, and Tesla V100"):
            check_precision(_trainer(accelerator="auto", precision=precision))
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: True)
    check_precision(_trainer(accelerator="cuda", precision="bf16-mixed"))


H3DE_TINY = [
    "model.h3de_net.preset=tiny",
    "model.h3de_net.region_grid=null",
    "model.h3de_net.region_size=[2,2,2]",
    "model.h3de_net.topk=[2,2,1,1]",
]


def _fast_run(blob_dataset, tmp_path, *overrides):
    return load_config(
        None,
        [
            f"data.root={blob_dataset.parent}",
            f"output_dir={tmp_path / 'runs'}",
            "data.patch_size=[32,32,32]",
            "data.spacing_mm=[3,3,3]",
            "data.batch_size=2",
            "trainer.enable_progress_bar=false",
            "trainer.fast_dev_run=true",
            "logger=none",
            *overrides,
        ],
    )


@pytest.mark.parametrize(("model", "loss"), [("h3de_net", "spatial_ce"), ("h3de_net_anchor", "anchor")])
def test_h3de_net_trains_in_bf16_mixed_on_the_cpu(blob_dataset, tmp_path, model, loss):
    """A training and a validation step of both heads under CPU bf16 autocast (V-BRA's depthwise convolution once
    crashed in its backward pass): a finite loss."""
    cfg = _fast_run(blob_dataset, tmp_path, f"model={model}", f"loss={loss}", *H3DE_TINY)
    cfg.trainer.precision = "bf16-mixed"
    cfg.trainer.accelerator = "cpu"
    result = train(cfg)
    assert math.isfinite(result.metrics["train/loss_step"])
    assert math.isfinite(result.metrics["val/mre_mm"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU")
def test_16_mixed_trains_on_a_gpu(blob_dataset, tmp_path):
    cfg = _fast_run(blob_dataset, tmp_path, "model=h3de_net", *H3DE_TINY, "trainer.accelerator=gpu")
    cfg.trainer.precision = "16-mixed"
    result = train(cfg)
    assert math.isfinite(result.metrics["train/loss_step"])
