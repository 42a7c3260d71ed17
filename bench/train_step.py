"""Time one finetune training step of each foundation model, the official protocol against ours, in one run.

The reference points (quality bar of the project, measured on an H100 with the official code):

- ProFound finetune step: frozen ConvNeXt V2-tiny 3D encoder + UNETR decoder (feature size 32, InstanceNorm3d),
  fp32, batch 2 of 3 x 64 x 224 x 224 (C x D x H x W): 166 ms, 43 % of it in the decoder's InstanceNorm3d.
- ProViCNet protocol step: ViT-S/14 with 4 registers, last two blocks + norms + head trainable, 16 slices of
  3 x 448 x 448: 49 ms.

Each variant builds the network from ``common.networks`` (the same modules the bundles use), applies the FM's
freezing protocol, and times forward + loss + backward + AdamW step (CUDA events, median over ``--steps`` after
``--warmup``). The variants stack our speed-ups one at a time, so the table shows where the time goes:

- ``fp32``: the official protocol as written (fp32, eager, frozen encoder by ``requires_grad=False`` only).
- ``bf16``: bf16 autocast.
- ``bf16+compile``: bf16 with ``torch.compile`` (Inductor fuses the norms and activations).
- ``bf16+compile+cl``: the above with channels-last (NDHWC) weights and input, and ``cudnn.benchmark``.
- ``bf16+compile+cached`` (ProFound only): the frozen encoder's four stage maps computed once and reused, as a
  finetune run can across epochs when the encoder is frozen and the input of a case does not change; the step is
  the decoder's forward and backward.

A frozen trunk builds no autograd graph already: with ``requires_grad=False`` on its parameters and an input that
needs no gradient, autograd records nothing, so ``torch.no_grad`` around it would change nothing (ProViCNet's
protocol trains every LayerNorm, so its backward runs through all blocks by design).

Usage: ``python bench/train_step.py --model profound --out bench/results`` (CUDA required for meaningful numbers; on
CPU use ``--small`` to check that it runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from common.networks.profound import ProFoundDense, freeze_profound_finetune
from common.networks.provicnet import ProViCNetDense, freeze_provicnet_finetune

VARIANTS = ("fp32", "bf16", "bf16+compile", "bf16+compile+cl", "bf16+compile+cached")


def build_profound(small: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Frozen ProFound-tiny + UNETR (feature size 32, instance norm): batch 2 of (3, 224, 224, 64) (H, W, D)."""
    size, shape = ("atto", (2, 3, 64, 64, 32)) if small else ("tiny", (2, 3, 224, 224, 64))
    model = freeze_profound_finetune(
        ProFoundDense(
            encoder_size=size, in_channels=3, out_channels=2, decoder="unetr", feature_size=32, norm_name="instance"
        )
    )
    x = torch.randn(shape)
    y = torch.randint(0, 2, (shape[0], *shape[2:]))
    return model, x, y


def build_provicnet(small: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """ProViCNet ViT-S/14 (4 registers), 3 neighbouring slices per stack: 16 slices of 448 x 448 -> (1, 1, H, W, 16)."""
    side, depth = (112, 4) if small else (448, 16)
    model = ProViCNetDense(out_channels=2, n_modalities=1, n_slices=3, slice_size=side)
    freeze_provicnet_finetune(model)
    x = torch.randn(1, 1, side, side, depth)
    y = torch.randint(0, 2, (1, side, side, depth))
    return model, x, y


BUILDERS = {"profound": build_profound, "provicnet": build_provicnet}


def time_variant(
    model_name: str, variant: str, steps: int, warmup: int, small: bool, device: torch.device, profile: bool = False
) -> dict:
    torch.manual_seed(0)
    model, x, y = BUILDERS[model_name](small)
    model, x, y = model.to(device), x.to(device), y.to(device)
    torch.backends.cudnn.benchmark = variant.endswith("+cl")
    if variant.endswith("+cl") and x.ndim == 5:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    forward = model
    if variant.endswith("+cached"):
        if not isinstance(model, ProFoundDense):
            raise ValueError("the cached variant applies to ProFound's frozen encoder only")
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            xn, stages = model._trunk(x)
            inputs = [t.detach() for t in model._decoder_inputs(stages)]
        decoder = torch.compile(model.decoder)

        def forward(_: torch.Tensor) -> torch.Tensor:
            return model.encoder.from_native(decoder(xn, inputs))

    elif "compile" in variant:
        forward = torch.compile(model)
    use_bf16 = variant != "fp32"

    def step() -> float:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(forward(x).float(), y)
        loss.backward()
        optimiser.step()
        return float(loss.detach())

    model.train()
    compile_start = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_seconds = time.perf_counter() - compile_start
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - t0))
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    ms = statistics.median(times)
    batch = x.shape[0]
    result = {
        "model": model_name,
        "variant": variant,
        "ms_per_step": round(ms, 2),
        "volumes_per_s": round(1000 * batch / ms, 2),
        "input_shape": list(x.shape),
        "trainable_params": sum(p.numel() for p in params),
        "warmup_seconds": round(warm_seconds, 1),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), action="append", help="profound and/or provicnet")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each variant")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # PyTorch's defaults, as the official code runs them: cuDNN convolutions may use TF32, matmuls do not
    rows = []
    for model_name in args.model or sorted(BUILDERS):
        for variant in args.variants.split(","):
            row = time_variant(model_name, variant, args.steps, args.warmup, args.small, device, args.profile)
            rows.append(row)
            base = next(r for r in rows if r["model"] == model_name)
            row["speedup_vs_fp32"] = round(base["ms_per_step"] / row["ms_per_step"], 2)
            print(json.dumps(row), flush=True)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "small": args.small,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"train_step_{'cpu_small' if device.type == 'cpu' else torch.cuda.get_device_name().split()[1].lower()}.json"
    (args.out / name).write_text(json.dumps(info, indent=2))
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
