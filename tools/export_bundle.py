"""Export one of the study's bundles as a self-contained MONAI bundle to share through a model zoo (README, "Share a
bundle").

    python -m tools.export_bundle BUNDLE --out DIR [--run_dir RUN_OUTPUT_DIR | --weights FILE] [--zip]

``BUNDLE`` is a bundle name (``bundles/<name>``, ``examples/byo_fm/bundles/<name>``), ``tools`` (the analysis
bundle) or a bundle folder. ``DIR/<name>/`` receives:

- ``configs/``: ``train.json``, ``evaluate.json``, ``multi_gpu_train.json`` with every macro resolved (the
  repository's bundles take shared sections from ``common/configs/downstream.json``), an ``inference.json`` that
  predicts a folder of NIfTI images (``--dataset_dir``), the two tracking overlays, ``metadata.json`` (with the
  source run's test metric and trivial baseline) and MONAI's metadata schema, so ``verify_metadata`` runs offline;
- ``scripts/common/``: the project code the configs reach (the modules they name and everything those import),
  copied, not installed. The configs load it from ``<bundle_root>/scripts`` (config id ``common``), so the bundle runs
  from any working directory with ``--bundle_root`` and needs no ``pip install`` of this repository. Carried rather
  than pinned: the project is not on a package index, and a carried copy cannot drift from the weights it was
  trained with;
- ``models/model.pt`` (the run's trained weights), ``models/model.ts`` (TorchScript, when the network scripts) and,
  for a finetune run, ``models/pretrained.pt`` (the pretrained encoder it started from, so that ``train.json`` can
  finetune again);
- ``docs/README.md`` for the person who downloads it, and ``LICENSE``.

The same inputs give byte-identical files (and zip): JSON is written with sorted keys' order kept from the
sources, files are copied byte for byte, and the zip has fixed timestamps and sorted entries.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import logging
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("tools.export_bundle")

#: config id under which an exported config reaches the carried package (``@common.bundle...``)
CODE_ID = "common"
_CODE_REF = re.compile(r"(?<![\w.@'\"])common\.(?=\w)")
_MODULE_NAMES = re.compile(r"common(?:\.\w+)+")
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)
SCHEMA = REPO / "common" / "configs" / "schema" / "meta_schema_20240725.json"
TRACKING = {"tracking_sqlite.json": REPO / "mlflow_config" / "sqlite.json",
            "tracking_server.json": REPO / "mlflow_config" / "server.json"}  # fmt: skip


class ExportError(ValueError):
    """A bundle, run folder or weights file that cannot be exported, with what to do."""


# ---------------------------------------------------------------------------------------------------------- configs
def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {path}: {err}") from None


def resolve_macros(value: object, root: Path = REPO, _files: dict | None = None) -> object:
    """``value`` with every MONAI macro (a string ``"%path#id#..."``, ``path`` relative to ``root``) replaced by a
    copy of the content it names, recursively (MONAI opens macro paths relative to the working directory; an
    exported bundle has none to open)."""
    files = {} if _files is None else _files
    if isinstance(value, dict):
        return {k: resolve_macros(v, root, files) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_macros(v, root, files) for v in value]
    if isinstance(value, str) and value.startswith("%") and "#" in value:
        path, *ids = value[1:].split("#")
        if path not in files:
            files[path] = _load_json(root / path)
        node = files[path]
        for key in ids:
            try:
                node = node[int(key)] if isinstance(node, list) else node[key]
            except (KeyError, IndexError, ValueError):
                raise ExportError(f"macro {value!r}: {path} has no {'#'.join(ids)}") from None
        return resolve_macros(copy.deepcopy(node), root, files)
    return value


def _rewrite(value: object, key: str | None = None) -> object:
    """Point the config's uses of the ``common`` package at the carried copy: ``$`` expressions use ``@common.``
    instead of the module, and ``_target_`` paths in ``common`` become ``$@common....`` references."""
    if isinstance(value, dict):
        return {k: _rewrite(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, key) for v in value]
    if not isinstance(value, str) or key == "_comment":
        return value
    if key == "_target_" and value.startswith("common."):
        return "$@" + value
    if value.startswith("$") and not value.startswith("$import"):
        return _CODE_REF.sub("@common.", value)
    return value


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def named_modules(configs: Iterable[object]) -> list[str]:
    """The ``common`` modules the configs name (the longest importable prefix of each dotted name)."""
    names: set[str] = set()

    def visit(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, str):
            for dotted in _MODULE_NAMES.findall(value):
                parts = dotted.split(".")
                for n in range(len(parts), 0, -1):
                    if _module_file(".".join(parts[:n])) is not None:
                        names.add(".".join(parts[:n]))
                        break

    for config in configs:
        visit(config)
    return sorted(names)


def _imports_of(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # a submodule imported by name
    return {m for m in found if m == "common" or m.startswith("common.")}


def module_closure(names: Iterable[str]) -> list[Path]:
    """The source files of ``names`` and of every ``common`` module they import, at any depth (also imports inside
    functions), with the ``__init__.py`` of each package on the way."""
    todo, seen, files = list(names), set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue  # a name imported from a module, not a module
        files.add(path)
        parts = name.split(".")
        todo.extend(".".join(parts[:n]) for n in range(1, len(parts)))
        todo.extend(_imports_of(name, path))
    return sorted(files)


# -------------------------------------------------------------------------------------------------------- the bundle
def find_bundle(bundle: str) -> Path:
    """The folder of ``bundle``: a path, ``tools``, or a name under ``bundles/`` or ``examples/*/bundles/``."""
    candidates = [Path(bundle), REPO / "bundles" / bundle, *sorted(REPO.glob(f"examples/*/bundles/{bundle}"))]
    if bundle == "tools":
        candidates.insert(0, REPO / "tools")
    for folder in candidates:
        if (folder / "configs" / "metadata.json").is_file():
            return folder.resolve()
    known = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir())
    raise ExportError(f"no bundle {bundle!r}: give a bundle folder, 'tools' or one of {', '.join(known)}")


def _executed_config(run_dir: Path) -> dict:
    configs = sorted(run_dir.glob("config_*.json"))
    return _load_json(configs[-1]) if configs else {}


def _run_results(run_dir: Path) -> dict:
    """Test metric, baseline and run id of a run folder, from its MLflow run (``mlflow_run.json``), else {}."""
    state_path = run_dir / "mlflow_run.json"
    if not state_path.is_file():
        return {}
    state = _load_json(state_path)
    try:
        from mlflow import MlflowClient

        run = MlflowClient(state["tracking_uri"]).get_run(state["run_id"])
    except Exception as err:  # noqa: BLE001 - a store that cannot be read leaves the results out, with a warning
        logger.warning(f"the MLflow run of {run_dir} cannot be read ({err}); metadata.json gets no test results")
        return {"run_id": state.get("run_id")}
    metrics, tags = run.data.metrics, run.data.tags
    results = {"run_id": run.info.run_id, "metric": tags.get("metric_name"), "test_metric": metrics.get("test_metric"),
               "baseline_metric": metrics.get("baseline_metric"), "baseline": tags.get("baseline"),
               "profile": tags.get("profile"), "seed": tags.get("seed"), "regime": tags.get("regime")}  # fmt: skip
    return {k: v for k, v in results.items() if v is not None}


def _code_loader(bundle_root: str = "@bundle_root") -> str:
    """The expression of config id ``common``: ``<bundle_root>/scripts`` first on ``sys.path``, the modules of
    ``_code_modules`` imported, the carried ``common`` package returned. (No word "import" in it: MONAI parses any
    expression holding that word as Python before replacing its ``@`` references.)"""
    path = f"os.path.join(os.path.abspath({bundle_root}), 'scripts')"
    return (f"$[sys.path.insert(0, {path}) if {path} not in sys.path else None, "
            "[load_module(m) for m in @_code_modules]] and sys.modules['common']")  # fmt: skip


_EXPORT_IMPORTS = ["$import os", "$import sys", "$from importlib import import_module as load_module", "$import torch",
                   "$import monai"]  # fmt: skip


def _exported_train(train: dict, modules: list[str], profile: str | None, finetune: bool) -> dict:
    config = {"imports": list(_EXPORT_IMPORTS), "bundle_root": ".", CODE_ID: _code_loader(), "_code_modules": modules}
    for key, value in train.items():
        if key == "imports":
            continue
        config[key] = value
    if profile:
        config["profile"] = profile
    config["study_dir"] = "$@bundle_root + '/results'"
    # MONAI's train properties: the dataset folder (of the datalist, or of the synthetic cohort made without one)
    config["dataset_dir"] = ("$os.path.dirname(os.path.abspath(@datalist)) if @datalist else "
                             "@study_dir + '/cohort-' + @profile")  # fmt: skip
    if finetune:
        config["pretrained_ckpt"] = "$@bundle_root + '/models/pretrained.pt'"
    handlers = config.get("train", {}).get("handlers", []) if isinstance(config.get("train"), dict) else []
    for handler in handlers:  # MONAI's optional property val_interval: a reference, as its property check expects
        if isinstance(handler, dict) and handler.get("_target_") == "ValidationHandler":
            config["val_interval"] = handler.get("interval", 1)
            handler["interval"] = "@val_interval"
    return config


def _exported_inference(train: dict) -> dict:
    """A stand-alone ``inference.json``: the bundle's network and inferer over a folder of NIfTI images."""
    config = dict(train)
    for key in ("train", "validate", "test", "initialize", "run", "evaluate", "inference", "multi_gpu",
                "tracking_checks", "tracking_handlers", "tracker", "run_tags", "run_params", "tracked_validator",
                "tracked_artifacts", "optimizer", "lr_scheduler", "loss", "network", "resume_ckpt"):  # fmt: skip
        config.pop(key, None)
    config.update({
        "_comment": "Predicts every case of --dataset_dir (a folder of NIfTI images, <case>_t2w.nii.gz and for "
                    "segmentation <case>_adc.nii.gz, or any *.nii.gz for the T2W-only tasks) and writes the "
                    "predictions on each input's grid, with its affine, to --output_dir (docs/README.md).",
        "dataset_dir": "$@bundle_root + '/sample_data'",
        "output_dir": "$@bundle_root + '/predictions'",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "network": "$@common.bundle.load_trained(@network_def, @checkpoint, @device)",
        "dataset": {"_target_": "Dataset", "data": "$@common.bundle.plain_datalist(@dataset_dir, @task)",
                    "transform": "$@common.bundle.plain_transforms(@task, @profile)"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "amp": "@amp", "decollate": False,
                      "prepare_batch": "$@common.bundle.plain_prepare_batch",
                      "val_handlers": [{"_target_": "$@common.bundle.PlainPredictionWriter", "task": "@task",
                                        "output_dir": "@output_dir"}]},
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@evaluator.run()"],
    })  # fmt: skip
    return config


def _dump(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=4) + "\n")


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())


def _script(bundle_root: Path, target: Path) -> bool:
    """``models/model.ts``: the exported ``train.json``'s ``network_def`` with ``models/model.pt``, built through the
    exported config and its carried code in a subprocess (what a user of the export gets), scripted; False when the
    network does not script (the export is complete without it)."""
    import subprocess

    program = (  # the carried code imported by a relative path first, so the archive names no folder of this machine
        "import sys, torch; sys.path.insert(0, 'scripts'); import common.bundle, common.networks; "
        "from monai.bundle import ConfigParser; parser = ConfigParser(); parser.read_config('configs/train.json'); "
        "parser['bundle_root'] = '.'; net = parser.get_parsed_content('network_def'); "
        "common.bundle.load_trained(net, 'models/model.pt'); net.eval(); "
        "torch.jit.save(torch.jit.script(net), sys.argv[1])"
    )  # fmt: skip
    # nothing written into the export; one hash seed, so TorchScript lists the constants in one order
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": "", "PYTHONHASHSEED": "0"}
    done = subprocess.run([sys.executable, "-c", program, str(target.resolve())], capture_output=True, text=True,
                          cwd=bundle_root, env=env)  # fmt: skip
    if done.returncode != 0:
        target.unlink(missing_ok=True)
        logger.warning(f"the network does not script; no models/model.ts ({done.stderr.strip().splitlines()[-1:]})")
        return False
    _reproducible_archive(target)
    return True


def _reproducible_archive(path: Path) -> None:
    """Make a TorchScript archive reproducible: rewritten without its ``*.debug_pkl`` records (source ranges that
    name the absolute folder it was scripted in; TorchScript loads and runs without them), with fixed timestamps,
    and with the random half of ``.data/serialization_id`` (torch writes a checksum of the records followed by random
    digits) replaced by zeros."""
    with zipfile.ZipFile(path) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist() if not i.filename.endswith(".debug_pkl")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            if name.endswith(".data/serialization_id"):
                digits = data.decode()
                data = (digits[: len(digits) // 2] + "0" * (len(digits) - len(digits) // 2)).encode()
            archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_TIME), data)


def export_bundle(
    bundle: str | Path,
    out: str | Path,
    run_dir: str | Path | None = None,
    weights: str | Path | None = None,
    make_zip: bool = False,
    torchscript: bool = True,
    log_to_mlflow: bool = True,
) -> Path:
    """Export ``bundle`` to ``out/<name>`` (module docstring); returns that folder (or the zip with ``make_zip``).
    ``torchscript=False`` skips ``models/model.ts`` (scripting takes seconds per bundle). With ``run_dir`` and
    ``make_zip``, the zip is also logged to the run's MLflow run (artifact ``export/<name>.zip``) unless
    ``log_to_mlflow`` is False."""
    source = find_bundle(str(bundle))
    name = source.name if source != REPO / "tools" else "vfm_analysis"
    if run_dir is not None and weights is not None:
        raise ExportError("give --run_dir or --weights, not both")
    run = Path(run_dir).resolve() if run_dir is not None else None
    if run is not None and not (run / "models" / "model.pt").is_file():
        raise ExportError(f"run folder {run} has no models/model.pt: give the output_dir of a finished run")
    weight_file = run / "models" / "model.pt" if run is not None else (Path(weights) if weights else None)
    if weight_file is not None and not weight_file.is_file():
        raise ExportError(f"weights file {weight_file} does not exist")
    target = Path(out) / name
    if target.exists():
        shutil.rmtree(target)
    configs = {p.name: resolve_macros(_load_json(p)) for p in sorted((source / "configs").glob("*.json"))}
    metadata = configs.pop("metadata.json")
    executed = _executed_config(run) if run is not None else {}
    results = _run_results(run) if run is not None else {}
    tracking = {n: _load_json(p) for n, p in TRACKING.items()}
    modules = named_modules([*configs.values(), *tracking.values()])
    modules += ["common.bundle.plain"] if "train.json" in configs else []
    for path in module_closure(modules):
        _copy(path, target / "scripts" / path.relative_to(REPO))
    _copy(SCHEMA, target / "configs" / "schema" / SCHEMA.name)
    _copy(source / "configs" / "logging.conf", target / "configs" / "logging.conf")
    license_file = (
        source / "LICENSE" if (source / "LICENSE").is_file() else REPO / "bundles" / "unet_segmentation" / "LICENSE"
    )
    _copy(license_file, target / "LICENSE")

    if "train.json" in configs:
        train = configs.pop("train.json")
        finetune = train.get("init") == "pretrained" and "pretrained_ckpt" in train
        profile = executed.get("profile") or results.get("profile")
        exported = _rewrite(_exported_train(train, sorted(set(modules)), profile, finetune))
        _dump(target / "configs" / "train.json", exported)
        if "task" in exported:  # a downstream or specialised bundle (the pretraining bundles predict nothing)
            _dump(target / "configs" / "inference.json", _rewrite(_exported_inference(exported)))
        if "evaluate.json" in configs:  # scores the shipped weights unless --checkpoint says otherwise
            evaluate = {**configs.pop("evaluate.json"), "checkpoint": "$@bundle_root + '/models/model.pt'"}
            _dump(target / "configs" / "evaluate.json", _rewrite(evaluate))
        if "multi_gpu_train.json" in configs:
            _dump(target / "configs" / "multi_gpu_train.json", _rewrite(configs.pop("multi_gpu_train.json")))
        configs.pop("inference.json", None)  # replaced by the plain-image inference above
        for file, config in tracking.items():
            _dump(target / "configs" / file, _rewrite(config))
        pretrained = Path(str(executed.get("pretrained_ckpt", ""))) if finetune else None
        if pretrained is not None and pretrained.is_file():
            _copy(pretrained, target / "models" / "pretrained.pt")
        if weight_file is not None:
            _copy(weight_file, target / "models" / "model.pt")
            if torchscript:
                _script(target, target / "models" / "model.ts")
    for file, config in configs.items():  # the tools bundle's analyze.json
        config = dict(config)
        config["imports"] = list(_EXPORT_IMPORTS)
        config = {"imports": config.pop("imports"), "bundle_root": ".", CODE_ID: _code_loader(),
                  "_code_modules": sorted(set(modules)), **config}  # fmt: skip
        _dump(target / "configs" / file, _rewrite(config))

    metadata = dict(metadata)
    if results:
        metadata["test_results"] = results
    _dump(target / "configs" / "metadata.json", metadata)
    _copy(source / "docs" / "README.md", target / "docs" / "README.md")
    _write_share_readme(target / "docs" / "README.md", name, metadata, results, weight_file is not None)
    if not make_zip:
        return target
    archive = Path(out) / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in target.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{name}/{path.relative_to(target).as_posix()}", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    if log_to_mlflow and results.get("run_id") and run is not None:
        _log_export(run, results["run_id"], archive)
    return archive


def _log_export(run_dir: Path, run_id: str, archive: Path) -> None:
    """Log the exported zip to the MLflow run it came from (artifact ``export/``); a store that cannot be written
    leaves a warning, not a failed export."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(_load_json(run_dir / "mlflow_run.json")["tracking_uri"])
        client.log_artifact(run_id, str(archive), "export")
        logger.info(f"logged {archive.name} to MLflow run {run_id} (artifact export/{archive.name})")
    except Exception as err:  # noqa: BLE001
        logger.warning(f"could not log {archive.name} to MLflow run {run_id}: {err}")


_REPO_ONLY_SECTIONS = ("Commands", "Outputs", "Export and share", "Run", "Files")
_PREDICTING_COMMANDS = """\
# predict a folder of NIfTI images (<case>_t2w.nii.gz; segmentation also <case>_adc.nii.gz)
python -m monai.bundle run --config_file $B/configs/inference.json --bundle_root $B \\
    --dataset_dir /data/my_images --output_dir /data/my_predictions
# check the metadata (offline: the schema is carried in configs/schema) and the network's input and output shapes
python -m monai.bundle verify_metadata --meta_file $B/configs/metadata.json \\
    --filepath $B/configs/schema/meta_schema_20240725.json
python -m monai.bundle verify_net_in_out network_def --meta_file $B/configs/metadata.json \\
    --config_file $B/configs/train.json --bundle_root $B --n 2
# train on your datalist (MONAI decathlon format, see Data below); outputs under $B/results
python -m monai.bundle run --config_file $B/configs/train.json --bundle_root $B --datalist /data/datalist.json
# score the test split of the datalist with models/model.pt
python -m monai.bundle run --config_file "['$B/configs/train.json','$B/configs/evaluate.json']" \\
    --bundle_root $B --datalist /data/datalist.json
# TorchScript of other weights (models/model.ts is the shipped one)
python -m monai.bundle ckpt_export network_def --filepath model.ts --ckpt_file $B/models/model.pt \\
    --config_file $B/configs/train.json --meta_file $B/configs/metadata.json --bundle_root $B"""


def _write_share_readme(path: Path, name: str, metadata: dict, results: dict, has_weights: bool) -> None:
    """``docs/README.md`` of the export: how to use the bundle from its own folder, then the bundle's own sections
    that hold outside the repository (task, protocol, baseline, data, references, license)."""
    title, _, body = path.read_text().partition("\n")
    sections = re.split(r"(?m)^## ", body)
    kept = [s for s in sections[1:] if not s.split("\n", 1)[0].strip().startswith(_REPO_ONLY_SECTIONS)]
    configs = path.parent.parent / "configs"
    packages = " ".join(["monai==" + str(metadata.get("monai_version", "")), "torch", "nibabel", "pytorch-ignite",
                         "mlflow"])  # fmt: skip
    lines = [
        title,
        "",
        sections[0].strip(),
        "",
        "## Using this bundle",
        "",
        f"A self-contained export of `{name}` from vfm-transfer: its configs hold no macros into the repository "
        "and the code they need is carried in `scripts/common` (loaded from `<bundle_root>/scripts` by the config "
        f"id `common`), so it needs only the packages of `configs/metadata.json` (`pip install {packages}`). "
        "Run it from any folder, with the bundle's folder as `--bundle_root`:",
        "",
        "```bash",
        f"B=/path/to/{name}",
    ]
    if (configs / "inference.json").is_file():
        lines.append(_PREDICTING_COMMANDS)
    elif (configs / "analyze.json").is_file():
        lines.append("python -m monai.bundle run --config_file $B/configs/analyze.json --bundle_root $B \\\n"
                     "    --tracking_uri sqlite:////path/to/study/mlflow.db --output_dir analysis")  # fmt: skip
    else:
        lines.append("python -m monai.bundle run --config_file $B/configs/train.json --bundle_root $B "
                     "--datalist /data/datalist.json")  # fmt: skip
    lines += ["```", ""]
    if "test_metric" in results:
        lines += ["## This export's weights", "",
                  f"From MLflow run `{results.get('run_id')}` (profile `{results.get('profile')}`, seed "
                  f"{results.get('seed')}, {results.get('regime')}): test {results.get('metric')} = "
                  f"{results['test_metric']:.4f}; the task's strongest trivial baseline scores "
                  f"{results.get('baseline_metric', float('nan')):.4f} on the same test images "
                  "(`configs/metadata.json`, `test_results`).", ""]  # fmt: skip
    elif not has_weights and (configs / "inference.json").is_file():
        lines += ["This export carries no trained weights: train it first, or put a `models/model.pt` in place.", ""]
    lines += ["## " + s.rstrip() + "\n" for s in kept]
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export_bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a bundle name (bundles/<name>), 'tools', or a bundle folder")
    parser.add_argument("--out", required=True, help="folder that receives <name>/ (and <name>.zip)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run_dir", help="output_dir of a finished run: its models/model.pt and MLflow results")
    source.add_argument("--weights", help="a models/model.pt of the bundle's network_def")
    parser.add_argument("--zip", action="store_true", help="also write <out>/<name>.zip")
    parser.add_argument("--no_torchscript", action="store_true", help="skip models/model.ts")
    parser.add_argument("--no_mlflow", action="store_true", help="do not log the zip to the run's MLflow run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = export_bundle(args.bundle, args.out, args.run_dir, args.weights, args.zip, not args.no_torchscript,
                               not args.no_mlflow)  # fmt: skip
    except ExportError as err:
        print(f"export_bundle: {err}", file=sys.stderr)
        return 2
    print(f"exported to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
