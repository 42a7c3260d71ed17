"""The outputs of a frozen encoder, computed once per distinct input and reused (issue "Fast where users pay").

A finetune run's ProFound encoder is frozen (``freeze_profound_finetune``, also the random-weight regime), yet every
epoch recomputes its forward pass for the same volumes: the validation and test inputs never change, and a training
input repeats whenever its augmentation does (super-resolution and classification: the left-right flip, two
variants per case). :class:`FeatureCache` keys each input volume by its exact content (a BLAKE2 digest of its bytes,
with its shape, dtype, device and the autocast state), so a hit is always the same computation, whatever the epoch,
the split or the data order; inputs that never repeat (distortion correction's fresh warps, the diffusion
denoisers' noisy inputs) only miss. Stored maps are detached copies; the cache holds at most ``max_bytes`` and stops
adding when full (no eviction churn).

A batch is served from the cache only when every one of its volumes is there; otherwise the encoder runs on the whole
batch as without a cache (and its volumes are stored), so the first epoch is computed exactly as uncached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

__all__ = ["FeatureCache"]


class FeatureCache:
    """Frozen-encoder outputs by input content (module docstring).

    Args:
        max_bytes: the most the stored maps may take (default 4 GiB).
        mode: ``"all"`` serves and stores every input; ``"eval"`` only those seen without gradients (validation,
            test, feature snapshots), for tasks whose training inputs never repeat.

    Attributes ``hits``, ``misses`` (volumes) and ``nbytes`` say how it went.
    """

    def __init__(self, max_bytes: int = 4 << 30, mode: str = "all") -> None:
        if max_bytes < 0:
            raise ValueError(f"FeatureCache: max_bytes must be >= 0, got {max_bytes}.")
        if mode not in ("all", "eval"):
            raise ValueError(f"FeatureCache: mode must be 'all' or 'eval', got {mode!r}.")
        self.max_bytes = int(max_bytes)
        self.mode = mode
        self.entries: dict[bytes, list[torch.Tensor]] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def key(x: torch.Tensor) -> bytes:
        """Content key of one input volume ``(C, ...)``."""
        data = x.detach().contiguous()
        digest = hashlib.blake2b(data.cpu().view(torch.uint8).numpy().tobytes(), digest_size=20)
        autocast = torch.get_autocast_dtype(data.device.type) if torch.is_autocast_enabled(data.device.type) else None
        digest.update(repr((tuple(data.shape), str(data.dtype), str(data.device), str(autocast))).encode())
        return digest.digest()

    def features(self, x: torch.Tensor, compute: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``compute(x)`` for the batch ``x`` ``(B, C, ...)``, from the cache when every volume of it is there."""
        if self.mode == "eval" and torch.is_grad_enabled():
            return compute(x)
        keys = [self.key(v) for v in x]
        if all(k in self.entries for k in keys):
            self.hits += len(keys)
            stored = [self.entries[k] for k in keys]
            return [torch.cat([s[i] for s in stored]) for i in range(len(stored[0]))]
        self.misses += len(keys)
        maps = compute(x)
        for b, k in enumerate(keys):
            if k in self.entries:
                continue
            entry = [m[b : b + 1].detach().clone() for m in maps]
            size = sum(t.numel() * t.element_size() for t in entry)
            if self.nbytes + size > self.max_bytes:
                break
            self.entries[k] = entry
            self.nbytes += size
        return maps

    def __repr__(self) -> str:
        return (f"FeatureCache({len(self)} volumes, {self.nbytes / 2**20:.1f} MiB of {self.max_bytes / 2**20:.0f}, "
                f"{self.hits} hits, {self.misses} misses)")  # fmt: skip
