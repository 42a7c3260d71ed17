"""The official ProFound and ProViCNet networks, imported from a local checkout, built at our configuration.

Used by ``bench/train_step.py --official DIR`` (issue 15, "like for like"). Nothing of the official code is part of
this repository; it is imported from ``DIR`` at run time. Layout of ``DIR`` (:data:`REQUIRED_FILES`)::

    DIR/ProFound/    github pipiwang/ProFound, branch demo (models/convnextv2.py, convnext_unter.py,
                     upernet_module.py, util.py)
    DIR/ProViCNet/   github pimed/ProViCNet (ProViCNet/ModelArchitectures/ProViCNet/ProViCNet.py, vit_config.py,
                     ModelArchitectures/lora.py, base_vit.py)
    DIR/dinov2/      github facebookresearch/dinov2 (hubconf.py), the code the official ProViCNet fetches with
                     torch.hub.load("facebookresearch/dinov2", ...); without it, torch hub's cached copy
                     <torch.hub.get_dir()>/facebookresearch_dinov2_main is used
    DIR/site/        optional: the official code's Python dependencies that this project does not have (timm,
                     einops, safetensors), e.g. pip install --no-deps --target DIR/site timm einops safetensors

What is changed in the official code, and why:

- The official ``ProViCNet.__init__`` builds its backbone with ``torch.hub.load("facebookresearch/dinov2",
  "dinov2_vits14_reg")``: a download of the dinov2 repository and of the pretrained weights. While the network is
  built, that call (the module's global ``load``) is pointed at the local dinov2 checkout with ``source="local",
  pretrained=False``: the same hub entry point and code, without the download; the weights do not matter because
  ours and theirs get identical weights afterwards.
- timm (imported by both official codes) imports torchvision at import time, in its data pipeline and two norm
  utilities (``timm/layers/create_norm.py``, ``timm/layers/norm_act.py``, ``timm/data/transforms.py``,
  ``timm/data/dataset_factory.py``; ``timm/layers/_fx.py`` and the other dataset imports are optional). When
  torchvision is absent, :func:`import_official` registers a placeholder for exactly the names those imports read
  (:data:`TORCHVISION_PLACEHOLDER`) while the official modules are imported, and removes it from ``sys.modules``
  right after, so nothing imported later sees a torchvision. Every placeholder class raises ``RuntimeError`` when
  instantiated and the placeholder modules have no other attributes, so a network that used one would fail instead
  of being timed; the networks timed use only ``timm.layers``' ``trunc_normal_`` and ``DropPath``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.profound import PROFOUND_SIZES, ProFoundDense, convert_profound_dense
from common.networks.provicnet import ProViCNetDense, convert_provicnet_official

__all__ = [
    "REQUIRED_FILES",
    "TORCHVISION_PLACEHOLDER",
    "OfficialCheckoutError",
    "OfficialModules",
    "OfficialProViCNetVolume",
    "check_layout",
    "copy_weights",
    "import_official",
    "official_profound",
    "official_provicnet",
]

#: Files that must exist under DIR, with the repository each comes from.
REQUIRED_FILES: dict[str, str] = {
    "ProFound/models/convnextv2.py": "github pipiwang/ProFound (branch demo)",
    "ProFound/models/convnext_unter.py": "github pipiwang/ProFound (branch demo)",
    "ProFound/models/upernet_module.py": "github pipiwang/ProFound (branch demo)",
    "ProFound/models/util.py": "github pipiwang/ProFound (branch demo)",
    "ProViCNet/ProViCNet/ModelArchitectures/ProViCNet/ProViCNet.py": "github pimed/ProViCNet",
    "ProViCNet/ProViCNet/ModelArchitectures/ProViCNet/vit_config.py": "github pimed/ProViCNet",
    "ProViCNet/ProViCNet/ModelArchitectures/lora.py": "github pimed/ProViCNet",
    "ProViCNet/ProViCNet/ModelArchitectures/base_vit.py": "github pimed/ProViCNet",
}
_DINOV2_HUBCONF = "dinov2/hubconf.py"
_MODULES = {
    "convnextv2": ("models.convnextv2", "ProFound"),
    "convnext_unter": ("models.convnext_unter", "ProFound"),
    "upernet_module": ("models.upernet_module", "ProFound"),
    "provicnet": ("ProViCNet.ModelArchitectures.ProViCNet.ProViCNet", "ProViCNet"),
}
#: The torchvision names timm reads at import time, by module; what the placeholder provides when torchvision is absent.
TORCHVISION_PLACEHOLDER: dict[str, tuple[str, ...]] = {
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "torchvision.transforms": ("ToTensor",),
    "torchvision.transforms.functional": ("InterpolationMode",),
    "torchvision.datasets": ("CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"),
}
_INTERPOLATION_MODES = ("NEAREST", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")
#: official ConvNeXt V2 factory per size of ours
_CONVNEXT_FACTORIES = {"atto": "convnextv2_atto", "femto": "convnextv2_femto", "pico": "convnext_pico",
                       "nano": "convnextv2_nano", "tiny": "convnextv2_tiny", "base": "convnextv2_base",
                       "large": "convnextv2_large", "huge": "convnextv2_huge"}  # fmt: skip


class OfficialCheckoutError(ValueError):
    """DIR is not a checkout of the official code in the layout of this module's docstring."""


@dataclass
class OfficialModules:
    """The imported official modules, the dinov2 checkout and the notes to print with the results."""

    root: Path
    convnextv2: types.ModuleType
    convnext_unter: types.ModuleType
    upernet_module: types.ModuleType
    provicnet: types.ModuleType
    dinov2_dir: Path
    notes: list[str] = field(default_factory=list)


def _dinov2_dir(root: Path) -> Path | None:
    for candidate in (root / "dinov2", Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main"):
        if (candidate / "hubconf.py").is_file():
            return candidate
    return None


def check_layout(root: Path) -> Path:
    """Raise :class:`OfficialCheckoutError` naming the first missing file of :data:`REQUIRED_FILES` (or the dinov2
    checkout); return the dinov2 directory."""
    root = Path(root)
    if not root.is_dir():
        raise OfficialCheckoutError(f"--official {root}: not a directory.")
    for rel, repo in REQUIRED_FILES.items():
        if not (root / rel).is_file():
            raise OfficialCheckoutError(
                f"--official {root} is not a checkout of the official code: missing {rel} (from {repo}); "
                "bench/README.md, section train_step.py, says how to get the checkouts."
            )
    dinov2 = _dinov2_dir(root)
    if dinov2 is None:
        raise OfficialCheckoutError(
            f"--official {root}: missing {_DINOV2_HUBCONF} (github facebookresearch/dinov2, which the official "
            f"ProViCNet loads with torch.hub) and no torch hub cache {Path(torch.hub.get_dir())}/"
            "facebookresearch_dinov2_main."
        )
    return dinov2


class _Unavailable:
    """Base of the torchvision placeholder classes: instantiating one raises."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"torchvision absent: {type(self).__module__}.{type(self).__qualname__} is a placeholder "
            "(bench/official.py) and was called; the official network needs torchvision after all."
        )


class _PlaceholderMember:
    """A distinct, hashable stand-in for an enum member that timm uses as a dict key at import time."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<placeholder {self.name}>"


def _torchvision_placeholder() -> dict[str, types.ModuleType]:
    """The placeholder modules of :data:`TORCHVISION_PLACEHOLDER` (and their parents), by module name."""
    modules = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.ops")}
    for name, attrs in TORCHVISION_PLACEHOLDER.items():
        module = modules.setdefault(name, types.ModuleType(name))
        for attr in attrs:
            cls = type(attr, (_Unavailable,), {"__module__": name})
            if attr == "InterpolationMode":  # dict keys at timm import time: distinct placeholder members
                for mode in _INTERPOLATION_MODES:
                    setattr(cls, mode, _PlaceholderMember(f"{name}.{attr}.{mode}"))
            setattr(module, attr, cls)
    for name, module in modules.items():
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(modules[parent], child, module)
    return modules


@contextmanager
def _scoped_sys_path(paths: list[Path]) -> Iterator[None]:
    added = [str(p) for p in paths if p.is_dir() and str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            sys.path.remove(p)


def import_official(root: Path) -> OfficialModules:
    """Import the official network modules from ``root`` (see the module docstring); raise
    :class:`OfficialCheckoutError` for a wrong layout or a missing dependency of the official code."""
    root = Path(root).resolve()
    dinov2_dir = check_layout(root)
    import monai.networks.blocks  # noqa: F401  (MONAI probes torchvision when first imported: before any placeholder)

    notes: list[str] = []
    placeholder: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("torchvision") is None:
        placeholder = _torchvision_placeholder()
        names = [f"{m}.{a}" for m, attrs in TORCHVISION_PLACEHOLDER.items() for a in attrs]
        notes.append(f"torchvision absent: placeholder for {', '.join(names)}, unused by the networks timed")
    paths = [root / "site", root / "ProFound", root / "ProViCNet"]
    loaded: dict[str, types.ModuleType] = {}
    sys.modules.update(placeholder)
    try:
        with _scoped_sys_path(paths), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's deprecation of timm.models.layers, dinov2's xFormers notices
            for key, (module_name, folder) in _MODULES.items():
                try:
                    module = importlib.import_module(module_name)
                except ModuleNotFoundError as err:
                    raise OfficialCheckoutError(
                        f"importing the official {module_name} ({folder}) needs the module {err.name!r}, which is "
                        f"not installed: pip install --no-deps --target {root / 'site'} timm einops safetensors"
                    ) from err
                if not Path(module.__file__).resolve().is_relative_to(root / folder):
                    raise OfficialCheckoutError(
                        f"{module_name} was imported from {module.__file__}, not from {root / folder}: another "
                        f"package named {module_name.split('.')[0]!r} shadows the checkout."
                    )
                loaded[key] = module
    finally:
        for name in placeholder:
            sys.modules.pop(name, None)
    return OfficialModules(root=root, dinov2_dir=dinov2_dir, notes=notes, **loaded)


def copy_weights(official: nn.Module, ours: nn.Module) -> None:
    """Copy the official network's weights into ours (strict: every name must match after the project's own
    converter, ``convert_profound_dense`` or ``convert_provicnet_official``)."""
    state = official.state_dict()
    converted = convert_profound_dense(state) if isinstance(ours, ProFoundDense) else convert_provicnet_official(state)
    ours.load_state_dict(converted, strict=True)


def _frozen_like(official: nn.Module, ours: nn.Module, rename: Callable[[str], str]) -> None:
    """Give ``official`` the trainable set of ``ours`` (by converted name) and check that the two sets match."""
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    theirs = set()
    for name, p in official.named_parameters():
        p.requires_grad_(rename(name) in trainable)
        if p.requires_grad:
            theirs.add(rename(name))
    if theirs != trainable:
        raise RuntimeError(f"trainable sets differ: only ours {sorted(trainable - theirs)[:5]}, "
                           f"only theirs {sorted(theirs - trainable)[:5]}")  # fmt: skip


def official_profound(mods: OfficialModules, ours: ProFoundDense, config: dict) -> nn.Module:
    """The official network of ``ours``, a frozen-encoder ``ProFoundDense(**config)``: ``ConvnextUNETR`` or
    ``UperNet`` on the official ``ConvNeXtV2`` of ``config["encoder_size"]`` with the same decoder widths and norm,
    our weights copied from it and ours' trainable set. Input ``(B, C, D, W, H)`` (the official axis order: ours
    reversed), output in the same order; the UperNet returns ``[logits, auxiliary logits]`` in training mode, as
    official."""
    size = config["encoder_size"]
    if size not in PROFOUND_SIZES:
        raise ValueError(f"official_profound: unknown encoder size {size!r}.")
    dims = list(PROFOUND_SIZES[size]["dims"])
    encoder = getattr(mods.convnextv2, _CONVNEXT_FACTORIES[size])(in_chans=config["in_channels"])
    if config["decoder"] == "unetr":
        official = mods.convnext_unter.ConvnextUNETR(
            in_channels=config["in_channels"],
            out_channels=config["out_channels"],
            convnext=encoder,
            feature_size=config["feature_size"],
            norm_name=config["norm_name"],
            hidden_size=dims,
        )
    else:
        official = mods.upernet_module.UperNet(
            encoder=encoder,
            in_channels=dims,
            out_channels=config["out_channels"],
            pool_scales=list(config.get("pool_scales", (1, 2, 3, 6))),
            hidden_size=config["hidden_size"],
            auxiliary_channels=config["auxiliary_channels"],
            use_auxiliary_head=True,
        )
    copy_weights(official, ours)
    _frozen_like(official, ours, lambda name: next(iter(convert_profound_dense({name: torch.empty(0)}))))
    official.encoder.eval()  # as ours (no stochastic depth at drop_path_rate 0 either way)
    return official


def official_provicnet(mods: OfficialModules, ours: ProViCNetDense, backbone: str = "dinov2_s_reg") -> nn.Module:
    """The official ``ProViCNet`` (``head="conv1"``, ``backbone`` = ViT-S/14 with 4 registers) with ours' output
    channels, our weights copied from it and ours' trainable set. Input slice stacks ``(N, 3, s, s)`` and positions
    ``(N, 2)``, output ``(N, K, 8s/14, 8s/14)``."""
    hub_name = mods.provicnet.dino_backbones[backbone]["name"]
    hub_load = mods.provicnet.load

    def local_load(repo: str, name: str, *args: object, **kwargs: object) -> nn.Module:
        if (repo, name) != ("facebookresearch/dinov2", hub_name):
            raise ValueError(f"official ProViCNet asked torch.hub for {repo}:{name}, expected {hub_name}.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.hub.load(str(mods.dinov2_dir), name, source="local", pretrained=False)

    mods.provicnet.load = local_load
    try:
        official = mods.provicnet.ProViCNet(num_classes=ours.head.segmentation_conv[-1].out_channels,
                                            backbone=backbone, head="conv1")  # fmt: skip
    finally:
        mods.provicnet.load = hub_load
    copy_weights(official, ours)
    _frozen_like(official, ours, lambda name: name)
    return official


class OfficialProViCNetVolume(nn.Module):
    """The official ProViCNet on a volume, with the slice plumbing of ours around it, so both sides do the same work:
    ``(B, 1, H, W, D)`` -> neighbour-slice stacks and positions (``ProViCNetDense.slice_stack``; the official data
    generator's ``getNChannel`` stacks, built there in the data loader), bilinear resize to ``slice_size`` ->
    official network -> bilinear resize to ``(H, W)`` -> ``(B, K, H, W, D)``.

    Args:
        official: the official ``ProViCNet`` (:func:`official_provicnet`).
        ours: the :class:`ProViCNetDense` it mirrors (its ``slice_stack`` and ``slice_size`` are used; none of its
            parameters).
    """

    def __init__(self, official: nn.Module, ours: ProViCNetDense) -> None:
        super().__init__()
        self.official = official
        self.slice_stack = ours.slice_stack
        self.slice_size = ours.slice_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W, D) -> (B, K, H, W, D)``."""
        b, _, h, w, d = x.shape
        stacks, pos = self.slice_stack(x)
        side = self.slice_size
        if side is not None and (stacks.shape[-2], stacks.shape[-1]) != (side, side):
            stacks = F.interpolate(stacks, size=[side, side], mode="bilinear", align_corners=False)
        y = self.official(stacks, pos)  # (B*D, K, 8s/14, 8s/14)
        if (y.shape[-2], y.shape[-1]) != (h, w):
            y = F.interpolate(y, size=[h, w], mode="bilinear", align_corners=False)
        return y.reshape(b, d, *y.shape[1:]).permute(0, 2, 3, 4, 1)
