"""Time one finetune training step of each foundation model: ours against the official code, in one run.

The networks and shapes (``SHAPES``; ``paper`` on CUDA, ``cpu`` on a CPU, ``small`` to check the script):

- ``profound``: frozen ConvNeXt V2 3D encoder (tiny; atto at ``small``) + UNETR decoder (feature size 32,
  InstanceNorm3d), batch 2 of 3 x 224 x 224 x 64 (H x W x D) at ``paper``.
- ``profound_upernet``: the same encoder + the UperNet decoder of the official demo and of our finetune bundles
  (width 512, auxiliary FCN head 256), loss = main + 0.4 x auxiliary as in the official ``engine/segment.py``.
- ``provicnet``: ViT-S/14 with 4 registers, our finetune protocol ``freeze_provicnet_finetune(..., norms="final")``
  (last two blocks, final norm, head trainable), the official ``conv_head8`` head, 16 slices of 3 x 448 x 448.

Each variant builds the network from ``common.networks`` (the modules the bundles use), applies the FM's freezing
protocol and times forward + loss + backward + AdamW step (CUDA events on a GPU, wall clock on a CPU; median over
``--steps`` after ``--warmup``). The variants stack our speed-ups one at a time:

- ``fp32``: fp32, eager, frozen encoder by ``requires_grad=False`` only (the official protocol).
- ``bf16``: bf16 autocast.
- ``bf16+compile``: bf16 with ``torch.compile`` (Inductor fuses the norms and activations).
- ``bf16+compile+cl`` (ProFound): the above with channels-last (NDHWC) weights and input, and ``cudnn.benchmark``.
- ``bf16+compile+cached`` (ProFound): the frozen encoder's four stage maps computed once and reused, as a finetune
  run can across epochs when the encoder is frozen and a case's input does not change; the step is the decoder's.

``--official DIR`` (issue 15, "like for like") adds the official network of each model, imported from a local
checkout (``bench/official.py`` says the layout and what is changed there), at exactly the configuration of our
``fp32`` variant: same shapes, decoder and widths, trainable set and dtype, and our weights loaded from it (the
forward outputs are compared before timing; the maximal absolute difference is reported and must be float rounding
at most). All variants of a model, the official one included, are then timed in one process, alternating step by
step, and every row gets its ratio to the official row of the same run.

A frozen trunk builds no autograd graph already: with ``requires_grad=False`` on its parameters and an input that
needs no gradient, autograd records nothing, so ``torch.no_grad`` around it would change nothing.

Usage: ``python bench/train_step.py`` (CUDA: paper shapes), ``python bench/train_step.py --official DIR --threads 1``
(on a CPU: the ``cpu`` shapes), ``--small`` to check the script quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is not an installed package
    sys.path.insert(0, str(REPO))

from bench import official  # noqa: E402  (imports no official code until import_official is called)
from common.networks.profound import ProFoundDense, freeze_profound_finetune  # noqa: E402
from common.networks.provicnet import ProViCNetDense, freeze_provicnet_finetune  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16+compile", "bf16+compile+cl", "bf16+compile+cached")
MODELS = ("profound", "profound_upernet", "provicnet")
#: models timed when --model is not given (without --official, the two of the H100 table)
DEFAULT_MODELS = ("profound", "provicnet")
#: shapes per profile: ProFound encoder size and input (B, C, H, W, D); ProViCNet slice side and slice count
SHAPES: dict[str, dict[str, object]] = {
    "paper": {"encoder_size": "tiny", "profound_input": (2, 3, 224, 224, 64), "slice_side": 448, "slices": 16},
    "cpu": {"encoder_size": "tiny", "profound_input": (1, 3, 64, 64, 32), "slice_side": 224, "slices": 4},
    "small": {"encoder_size": "atto", "profound_input": (1, 3, 32, 32, 16), "slice_side": 56, "slices": 2},
}
AUXILIARY_WEIGHT = 0.4  # official engine/segment.py: loss(main) + 0.4 * loss(auxiliary)
#: largest |ours - official| of the forward outputs, relative to the largest |output|, still counted as equal
EQUAL_TOLERANCE = 1e-4


@dataclass
class Built:
    """One of our networks with its input, target and the arguments it was built from."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    config: dict


def profound_config(model_name: str, shapes: str, feature_size: int = 32) -> dict:
    """Keyword arguments of our ``ProFoundDense`` for ``profound`` (UNETR) or ``profound_upernet``."""
    config = {"encoder_size": SHAPES[shapes]["encoder_size"], "in_channels": 3, "out_channels": 2}
    if model_name == "profound":
        return {**config, "decoder": "unetr", "feature_size": feature_size, "norm_name": "instance"}
    return {**config, "decoder": "upernet", "hidden_size": 512, "auxiliary_channels": 256}


def build(model_name: str, shapes: str, feature_size: int = 32) -> Built:
    """Our network with its freezing protocol, an input and a target. ProFound: ``(B, 3, H, W, D) -> (B, 2, H, W,
    D)``; ProViCNet: ``(1, 1, s, s, D) -> (1, 2, s, s, D)`` (D slices, each a stack of 3 neighbours)."""
    spec = SHAPES[shapes]
    if model_name == "provicnet":
        side, depth = spec["slice_side"], spec["slices"]
        config = {"out_channels": 2, "n_modalities": 1, "n_slices": 3, "slice_size": side}
        model = ProViCNetDense(**config)
        freeze_provicnet_finetune(model, norms="final")
        x = torch.randn(1, 1, side, side, depth)
        y = torch.randint(0, 2, (1, side, side, depth))
        return Built(model, x, y, config)
    config = profound_config(model_name, shapes, feature_size)
    model = freeze_profound_finetune(ProFoundDense(**config))
    shape = spec["profound_input"]
    x = torch.randn(shape)
    y = torch.randint(0, 2, (shape[0], *shape[2:]))
    return Built(model, x, y, config)


def applies(model_name: str, variant: str) -> bool:
    """Channels-last and the cached encoder are ProFound's (3D convolutions, a frozen convolutional encoder)."""
    return model_name != "provicnet" or not variant.endswith(("+cl", "+cached"))


def _profound_outputs(
    model: ProFoundDense, decoder: Callable, xn: torch.Tensor, stages: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Decoder outputs in the caller's axis order: ``[main]`` (UNETR) or ``[main, auxiliary]`` (UperNet)."""
    outputs = [decoder(xn, model._decoder_inputs(stages))]
    if model.decoder_name == "upernet":
        outputs.append(model.decoder.forward_auxiliary(xn, stages))
    return [model.encoder.from_native(o) for o in outputs]


def our_forward(model: nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """Our training forward as a list of outputs (ProFound UperNet: main and auxiliary from one encoder pass)."""
    if isinstance(model, ProFoundDense):

        def forward(x: torch.Tensor) -> list[torch.Tensor]:
            xn, stages = model._trunk(x)
            return _profound_outputs(model, model.decoder, xn, stages)

        return forward
    return lambda x: [model(x)]


@dataclass
class Runner:
    """One timed row: a step function and what the row reports."""

    model_name: str
    variant: str
    step: Callable[[], float]
    batch: int
    input_shape: list[int]
    trainable_params: int
    cudnn_benchmark: bool = False
    times: list[float] = field(default_factory=list)
    warm_seconds: float = 0.0


def _make_step(
    forward: Callable[[torch.Tensor], list[torch.Tensor]],
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    use_bf16: bool,
    device: torch.device,
) -> Callable[[], float]:
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            outputs = forward(x)
            loss = loss_fn(outputs[0].float(), y)
            for aux in outputs[1:]:
                loss = loss + AUXILIARY_WEIGHT * loss_fn(aux.float(), y)
        loss.backward()
        optimiser.step()
        return float(loss.detach())

    return step


def our_runner(
    model_name: str,
    variant: str,
    shapes: str,
    device: torch.device,
    feature_size: int = 32,
    state: dict[str, torch.Tensor] | None = None,
) -> Runner:
    """A row of ours: the network of :func:`build` (with the weights ``state`` if given) and ``variant``'s
    speed-ups."""
    torch.manual_seed(0)
    built = build(model_name, shapes, feature_size)
    if state is not None:
        built.model.load_state_dict(state, strict=True)
    model, x, y = built.model.to(device), built.x.to(device), built.y.to(device)
    if variant.endswith("+cl"):
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    forward = our_forward(model)
    if variant.endswith("+cached"):
        if not isinstance(model, ProFoundDense):
            raise ValueError("the cached variant applies to ProFound's frozen encoder only")
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            xn, stages = model._trunk(x)
            stages = [t.detach() for t in stages]
        decoder = torch.compile(model.decoder)

        def forward(_: torch.Tensor) -> list[torch.Tensor]:
            return _profound_outputs(model, decoder, xn, stages)

    elif "compile" in variant:
        forward = torch.compile(forward)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    step = _make_step(forward, params, x, y, variant != "fp32", device)
    return Runner(model_name, variant, step, x.shape[0], list(x.shape), sum(p.numel() for p in params),
                  cudnn_benchmark=variant.endswith("+cl"))  # fmt: skip


def official_runner(
    mods: official.OfficialModules, model_name: str, shapes: str, device: torch.device, feature_size: int = 32
) -> tuple[Runner, float, dict[str, torch.Tensor]]:
    """The official network at the configuration of our ``fp32`` row, our weights loaded from it. Returns the row,
    the largest |ours - official| of the two forward outputs (checked against ``EQUAL_TOLERANCE``) and the state
    dict of ours with those weights, for our rows."""
    torch.manual_seed(0)
    built = build(model_name, shapes, feature_size)
    ours, x, y = built.model, built.x, built.y
    if model_name == "provicnet":
        net = official.official_provicnet(mods, ours)
        theirs = official.OfficialProViCNetVolume(net, ours)

        def to_ours(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
            return outputs

        x_theirs, y_theirs = x, y
    else:
        net = theirs = official.official_profound(mods, ours, built.config)

        def to_ours(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
            return [o.permute(0, 1, 4, 3, 2) for o in outputs]  # official (B, K, D, W, H) -> ours (B, K, H, W, D)

        # the official datasets feed (B, C, D, W, H): the same volumes in the official axis order
        x_theirs, y_theirs = x.permute(0, 1, 4, 3, 2).contiguous(), y.permute(0, 3, 2, 1).contiguous()
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    ours, theirs = ours.to(device), theirs.to(device)
    x, y, x_theirs, y_theirs = x.to(device), y.to(device), x_theirs.to(device), y_theirs.to(device)
    ours.train()
    theirs.train()

    def forward_theirs(xo: torch.Tensor) -> list[torch.Tensor]:
        out = theirs(xo)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    with torch.no_grad():
        mine, official_out = our_forward(ours)(x), to_ours(forward_theirs(x_theirs))
    diff = max(float((a - b).abs().max()) for a, b in zip(mine, official_out, strict=True))
    scale = max(float(a.abs().max()) for a in mine)
    if diff > EQUAL_TOLERANCE * max(scale, 1.0):
        raise RuntimeError(f"{model_name}: ours and the official outputs differ by {diff:.3g} (scale {scale:.3g}).")
    del ours, mine, official_out
    params = [p for p in theirs.parameters() if p.requires_grad]
    step = _make_step(forward_theirs, params, x_theirs, y_theirs, False, device)
    runner = Runner(model_name, "official fp32", step, x.shape[0], list(x_theirs.shape), sum(p.numel() for p in params))
    return runner, diff, state


def _timed(runner: Runner, device: torch.device) -> float:
    torch.backends.cudnn.benchmark = runner.cudnn_benchmark
    if device.type != "cuda":
        t0 = time.perf_counter()
        runner.step()
        return 1000 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    runner.step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_round_robin(runners: list[Runner], steps: int, warmup: int, device: torch.device) -> None:
    """Warm up and time every runner, alternating one step each, so a machine's drift reaches all rows alike."""
    for _ in range(warmup):
        for runner in runners:
            t0 = time.perf_counter()
            _timed(runner, device)
            runner.warm_seconds += time.perf_counter() - t0
    for _ in range(steps):
        for runner in runners:
            runner.times.append(_timed(runner, device))


def _profile(runner: Runner) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def row_of(runner: Runner) -> dict:
    """The JSON row of a timed runner."""
    ms = statistics.median(runner.times)
    return {
        "model": runner.model_name,
        "variant": runner.variant,
        "ms_per_step": round(ms, 2),
        "volumes_per_s": round(1000 * runner.batch / ms, 2),
        "input_shape": runner.input_shape,
        "trainable_params": runner.trainable_params,
        "warmup_seconds": round(runner.warm_seconds, 1),
        "steps": len(runner.times),
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo`` on Linux) and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, action="append", help="profound, profound_upernet, provicnet")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--shapes", choices=sorted(SHAPES), help="default: paper on CUDA, cpu on a CPU")
    parser.add_argument("--small", action="store_true", help="same as --shapes small: tiny shapes to check the script")
    parser.add_argument("--feature_size", type=int, default=32, help="UNETR feature size of ours and theirs")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU timing); default: torch's")
    parser.add_argument("--official", type=Path, metavar="DIR",
                        help="also time the official networks from this checkout (bench/official.py)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each variant")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = "small" if args.small else args.shapes or ("paper" if device.type == "cuda" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    mods = None
    if args.official is not None:
        mods = official.import_official(args.official)  # raises OfficialCheckoutError naming what is missing
        for note in mods.notes:
            print(f"note: {note}", flush=True)
    models = args.model or (MODELS if mods is not None else DEFAULT_MODELS)
    # PyTorch's defaults, as the official code runs them: cuDNN convolutions may use TF32, matmuls do not
    rows, equality = [], {}
    for model_name in models:
        runners, state = [], None
        if mods is not None:
            runner, diff, state = official_runner(mods, model_name, shapes, device, args.feature_size)
            runners.append(runner)
            equality[model_name] = diff
            print(f"{model_name}: ours and official forward outputs, max |difference| = {diff:.3g}", flush=True)
        for variant in args.variants.split(","):
            if applies(model_name, variant):
                runners.append(our_runner(model_name, variant, shapes, device, args.feature_size, state))
        time_round_robin(runners, args.steps, args.warmup, device)
        model_rows = [row_of(r) for r in runners]
        fp32 = next((r for r in model_rows if r["variant"] == "fp32"), None)
        for r, runner in zip(model_rows, runners, strict=True):
            if fp32 is not None and r["variant"] != "official fp32":
                r["speedup_vs_fp32"] = round(fp32["ms_per_step"] / r["ms_per_step"], 2)
            if mods is not None:
                r["vs_official"] = round(model_rows[0]["ms_per_step"] / r["ms_per_step"], 2)
            print(json.dumps(r), flush=True)
            if args.profile and device.type == "cuda":
                _profile(runner)
        rows.extend(model_rows)
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shapes": shapes,
        "shape_spec": SHAPES[shapes],
        "feature_size": args.feature_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "small": shapes == "small",
        "rows": rows,
    }
    if mods is not None:
        info["official"] = {"dir": str(args.official), "max_abs_output_difference": equality, "notes": mods.notes}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"cpu{torch.get_num_threads()}" if device.type == "cpu" else torch.cuda.get_device_name().split()[1].lower()
    if mods is not None:
        name = f"train_step_official_{tag}{'_small' if shapes == 'small' else ''}.json"
    else:
        name = f"train_step_{'cpu_small' if device.type == 'cpu' else tag}.json"
    (args.out / name).write_text(json.dumps(info, indent=2))
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
