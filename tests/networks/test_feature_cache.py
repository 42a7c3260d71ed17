"""The frozen-encoder cache: a hit is exactly the uncached computation, only frozen encoders get one, the budget
holds, evaluation-only mode, and TorchScript ignores it."""

from __future__ import annotations

import pytest
import torch

from common.networks import ProFoundClassifier, ProFoundDense, enable_feature_cache, freeze_profound_finetune
from common.networks.feature_cache import FeatureCache


def _dense() -> ProFoundDense:
    torch.manual_seed(0)
    net = ProFoundDense("atto", 1, 2, decoder="upernet", hidden_size=16, auxiliary_channels=8)
    freeze_profound_finetune(net)
    return net.train()


def test_a_hit_returns_exactly_what_the_encoder_computes() -> None:
    net = _dense()
    x = torch.randn(2, 1, 32, 32, 16)
    plain = net(x)
    assert enable_feature_cache(net)
    first, second = net(x), net(x)
    cache = net.encoder.feature_cache
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert (cache.misses, cache.hits, len(cache)) == (2, 2, 2)
    loss = net(x).square().mean()
    loss.backward()  # the decoder trains on cached maps; the frozen encoder gets no gradient
    assert all(p.grad is None for p in net.encoder.parameters())
    assert any(p.grad is not None for p in net.decoder.parameters())


def test_a_batch_with_one_new_volume_runs_the_encoder_on_the_whole_batch() -> None:
    net = _dense()
    enable_feature_cache(net)
    a, b = torch.randn(1, 1, 32, 32, 16), torch.randn(1, 1, 32, 32, 16)
    net(a)
    net(torch.cat([a, b]))
    cache = net.encoder.feature_cache
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 2)
    net(torch.cat([b, a]))  # both known now, in another order
    assert cache.hits == 2
    flipped = torch.flip(a, dims=[2])
    net(flipped)
    assert cache.misses == 4  # another input is another key


def test_only_frozen_encoders_get_a_cache_and_scripting_ignores_it() -> None:
    scratch = ProFoundDense("atto", 1, 2, decoder="upernet", hidden_size=16, auxiliary_channels=8)
    assert not enable_feature_cache(scratch) and scratch.encoder.feature_cache is None
    net = _dense()
    enable_feature_cache(net)
    x = torch.randn(1, 1, 32, 32, 16)
    scripted = torch.jit.script(net.eval())
    assert torch.allclose(scripted(x), net(x), atol=1e-6)
    classifier = ProFoundClassifier("atto", 1, 4)
    freeze_profound_finetune(classifier)
    assert enable_feature_cache(classifier)


def test_budget_and_evaluation_only_mode() -> None:
    calls = []

    def compute(x: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(x))
        return [x * 2, x.sum(dim=1, keepdim=True)]

    full = FeatureCache(max_bytes=0)
    full.features(torch.ones(2, 1, 4, 4, 4), compute)
    assert len(full) == 0 and full.nbytes == 0  # nothing fits: computed, not kept
    evaluation = FeatureCache(mode="eval")
    x = torch.randn(1, 1, 4, 4, 4)
    evaluation.features(x, compute)
    assert len(evaluation) == 0  # with gradients on (training), nothing is kept
    with torch.no_grad():
        evaluation.features(x, compute)
        evaluation.features(x, compute)
    assert (len(evaluation), evaluation.hits, calls) == (1, 1, [2, 1, 1])  # the budget test's call, then two
    cache = FeatureCache()
    assert cache.fingerprint(x) != cache.fingerprint(x.double()) and cache.fingerprint(x) == cache.fingerprint(
        x.clone()
    )
    with pytest.raises(ValueError, match="mode"):
        FeatureCache(mode="sometimes")


def test_a_volume_that_shares_a_fingerprint_is_not_served_the_others_features() -> None:
    """A hit is an exact comparison, not only a fingerprint: a forged collision (same fingerprint, other content)
    gets its own computation; one changed voxel is another volume; the input copy counts in the budget."""

    def compute(x: torch.Tensor) -> list[torch.Tensor]:
        return [x * 3]

    cache = FeatureCache()
    a = torch.randn(1, 2, 3, 4, 5)
    cache.features(a, compute)
    assert cache.nbytes == 2 * a.numel() * a.element_size()  # the maps and the stored input
    b = a.clone()
    b[0, 0, 0, 0, 0] += 1.0
    assert cache.fingerprint(b[0]) != cache.fingerprint(a[0])
    torch.testing.assert_close(cache.features(b, compute)[0], b * 3)
    assert (cache.hits, cache.misses) == (0, 2)
    forged = b.clone()
    cache.entries[cache.fingerprint(forged[0])][0] = (a[0].clone(), [a * 3])  # pretend b's fingerprint held a
    cache.entries[cache.fingerprint(forged[0])].append((b[0].clone(), [b * 3]))
    torch.testing.assert_close(cache.features(forged, compute)[0], b * 3)  # the exact match, not the first
