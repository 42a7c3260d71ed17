"""The frozen-encoder cache, like for like: one ProFound finetune network (frozen encoder, decoder and head trained)
takes the same training steps over the same volumes twice, without and with ``common.networks.FeatureCache``
warmed by one pass (what every epoch after the first sees when the inputs repeat), in one process, alternating.

    python bench/encoder_cache.py [--profile demo] [--steps 10] [--out bench/results/encoder_cache_<machine>.json]

Prints and writes milliseconds per step and the ratio uncached / cached per task network, each built from its
bundle's own ``network_def`` at the profile (classification MLP head, segmentation UperNet + refinement,
super-resolution UperNet + residual sub-pixel head).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.bundle import init_network  # noqa: E402
from common.networks import enable_feature_cache, freeze_profound_finetune  # noqa: E402
from common.profiles import get_profile  # noqa: E402


def _networks(profile) -> dict[str, tuple[torch.nn.Module, int, tuple[int, int, int]]]:
    """Each task's network exactly as its ProFound finetune bundle builds it at ``profile`` (its ``network_def``)."""
    from monai.bundle import ConfigParser

    shape = profile.padded_size
    inputs = {"classification": (1, shape), "segmentation": (2, shape),
              "super_resolution": (1, (shape[0], shape[1], shape[2] // 2))}  # fmt: skip
    networks = {}
    os.chdir(REPO)  # the bundles' macros are relative to the repository root
    for task, (channels, size) in inputs.items():
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / f"profound_{task}_finetune" / "configs" / "train.json"))
        parser["profile"] = profile.name
        networks[task] = (parser.get_parsed_content("network_def"), channels, size)
    return networks


def _time(net: torch.nn.Module, volumes: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[float]:
    times = []
    for x in volumes:
        start = time.perf_counter()
        optimizer.zero_grad()
        out = net(x)
        out.float().square().mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    profile = get_profile(args.profile)
    rows = []
    for task, (net, channels, shape) in _networks(profile).items():
        net = init_network(net, "random", None, freeze_profound_finetune).train()  # as the bundle freezes it
        volumes = [torch.randn(args.batch, channels, *shape) for _ in range(args.steps)]
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], 1e-4)
        _time(net, volumes[:1], optimizer)  # warm-up
        plain = _time(net, volumes, optimizer)
        enable_feature_cache(net)
        _time(net, volumes, optimizer)  # the first epoch fills the cache
        cached = _time(net, volumes, optimizer)
        row = {"task": task, "ms_per_step_uncached": 1000 * statistics.median(plain),
               "ms_per_step_cached": 1000 * statistics.median(cached)}  # fmt: skip
        row["speedup"] = row["ms_per_step_uncached"] / row["ms_per_step_cached"]
        rows.append(row)
        print(f"{task:18s} uncached {row['ms_per_step_uncached']:8.1f} ms  cached {row['ms_per_step_cached']:8.1f} ms"
              f"  x{row['speedup']:.2f}", flush=True)  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d"), "profile": args.profile, "batch": args.batch, "steps": args.steps,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
              platform.machine(), "cores": os.cpu_count(), "device": "cpu", "rows": rows}  # fmt: skip
    out = Path(args.out or Path(__file__).parent / "results" / f"encoder_cache_{args.profile}_cpu{os.cpu_count()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
