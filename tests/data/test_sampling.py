from collections import Counter

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from monai.data import CacheDataset
from monai.transforms import Compose, Lambdad, RandGaussianNoised, RandScaleIntensityd

from h3de.data.sampling import EpochSampler, SeededSamples


def test_epoch_sampler_balances_cases_and_splits_over_ranks_like_lightning():
    sampler = EpochSampler(size=4, num_samples=10, seed=3)
    first = list(sampler)
    indices, seeds = zip(*first, strict=True)
    assert len(sampler) == 10 and sorted(Counter(indices).values()) == [2, 2, 3, 3]  # 2 full passes + 2 of a third
    assert len(set(seeds)) == 10  # repeats of a case are drawn with seeds of their own
    assert first == list(sampler)  # the order and the seeds depend on (seed, epoch) only: the same on every DDP rank
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and not set(seeds) & {s for _, s in second}

    # what Lightning's use_distributed_sampler does with it on 2 ranks: disjoint halves of the same list, and
    # set_epoch forwarded to this sampler
    ranks = [
        DistributedSamplerWrapper(EpochSampler(4, 10, seed=3), num_replicas=2, rank=r, shuffle=False) for r in (0, 1)
    ]
    for wrapper in ranks:
        wrapper.set_epoch(1)
    shares = [list(w) for w in ranks]
    assert [len(s) for s in shares] == [5, 5]
    assert shares[0] == second[0::2] and shares[1] == second[1::2]


def test_a_seeded_sample_depends_on_its_seed_only():
    calls = []
    transform = Compose(
        [
            Lambdad("x", lambda x: calls.append(1) or x * 2),  # deterministic: cached, run once per item
            RandGaussianNoised("x", prob=1.0, std=1.0),
            Compose([RandScaleIntensityd("x", factors=0.5, prob=1.0)]),  # nested: reseeded too
        ]
    )
    samples = SeededSamples(CacheDataset([{"x": torch.zeros(5)}, {"x": torch.ones(5)}], transform, progress=False))
    first = samples[0, 11]["x"]
    for item in [(1, 11), (0, 12), (0, 12)]:  # other draws in between do not change it
        samples[item]
    assert torch.equal(samples[0, 11]["x"], first)
    assert not torch.equal(samples[0, 12]["x"], first)  # another seed, another draw
    # the same draws on the other (cached) item: 2 + noise instead of 0 + noise, then the same scaling
    difference = samples[1, 11]["x"] - first
    torch.testing.assert_close(difference, difference[:1].expand(5))
    assert len(samples) == 2 and len(calls) == 2
