import pytest
import torch
from torch import nn

from h3de.cli import main
from h3de.errors import H3deError
from h3de.networks import register_network
from h3de.profile import format_table, peak_memory_bytes, profile_network


@register_network("_test_single_conv")
def _single_conv(in_channels: int, out_channels: int, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1, bias=False), nn.Conv3d(width, out_channels, 1))


def test_counts_parameters_and_flops_of_a_known_network():
    result = profile_network("_test_single_conv", {"width": 4}, (8, 10, 12), num_landmarks=2, repeats=1)
    voxels = 8 * 10 * 12
    assert result.parameters == 1 * 4 * 27 + (4 * 2 + 2)
    expected = 2 * (1 * 4 * 27 + 4 * 2) * voxels / 1e9  # two FLOPs per multiply-add, forward only
    assert result.forward_gflops == pytest.approx(expected, rel=1e-6)
    assert result.input_size == (1, 1, 8, 10, 12)
    assert result.forward_s > 0 and result.forward_backward_s > 0


def test_cpu_peak_memory_sees_a_large_temporary():
    size = 64 * 2**20
    peak = peak_memory_bytes(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    assert size <= peak < 1.1 * size


def test_table_and_cli(capsys):
    rows = [profile_network("unet", {"channels": [4, 8], "strides": [2]}, (16, 16, 16), 3, repeats=1)]
    table = format_table(rows)
    assert table.splitlines()[2].startswith("| unet | 1x1x16x16x16 |")
    assert main(["profile", "unet", "_test_single_conv", "--input", "16,16,16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| unet |" in out and "| _test_single_conv |" in out
    assert main(["profile", "unet", "--input", "16,x,16"]) == 2
    assert "--input" in capsys.readouterr().err


def test_bad_input_size():
    with pytest.raises(H3deError, match="three positive integers"):
        profile_network("unet", {}, (16, 16), 3)
