"""tools.export_bundle: every bundle exported and used where this repository is not (``import common`` fails):
metadata verified offline, network shapes verified, plain-image inference, one exported bundle trained; macros,
the carried module closure and reproducible archives checked directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from monai.bundle import ConfigParser

from common.data.phantom import make_cohort
from tools.export_bundle import ExportError, export_bundle, module_closure, named_modules, resolve_macros

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "train.json").is_file())
PRETRAIN = ("profound_pretrain", "provicnet_pretrain")
TRAINED = "unet_segmentation"  # the exported bundle trained for one epoch (specialised: needs no pretrained weights)

# Runs in a process that looks like a machine without this repository: the editable install's finder and the
# repository root are taken off the import path, and `import common` must fail before each bundle (the modules a
# previous bundle carried are forgotten, so each bundle proves its own copy is complete).
OUTSIDE = r"""
import importlib, importlib.util, json, os, sys
repo, work, images, datalist, plan = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(repo) and p != "."]
import torch
from monai.bundle import BundleWorkflow, ConfigWorkflow, run, verify_metadata, verify_net_in_out


def forget_carried_code():
    for name in [m for m in sys.modules if m == "common" or m.startswith("common.")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if not p.endswith(os.sep + "scripts")]
    importlib.invalidate_caches()
    assert importlib.util.find_spec("common") is None, "import common must fail outside the repository"


done = {}
for bundle, steps in plan.items():
    forget_carried_code()
    root = os.path.join(work, "export", bundle)
    configs = os.path.join(root, "configs")
    verify_metadata(meta_file=os.path.join(configs, "metadata.json"),
                    filepath=os.path.join(configs, "schema", "meta_schema_20240725.json"))
    done[bundle] = ["metadata"]
    if "net" in steps:
        extra = {"timesteps": torch.tensor([10])} if "modality_translation" in bundle else {}  # the denoisers
        verify_net_in_out(net_id="network_def", meta_file=os.path.join(configs, "metadata.json"),
                          config_file=os.path.join(configs, "train.json"), bundle_root=root, n=2,
                          extra_forward_args=extra)
        done[bundle].append("net")
    if "inference" in steps:
        run(config_file=os.path.join(configs, "inference.json"), bundle_root=root, dataset_dir=images,
            output_dir=os.path.join(work, "predictions", bundle))
        done[bundle].append("inference")
    if "train" in steps:
        for kind, config, extra in (("train", "train.json", {"datalist": datalist}),
                                    ("infer", "inference.json", {"dataset_dir": images})):
            flow = ConfigWorkflow(config_file=os.path.join(configs, config), workflow_type=kind, bundle_root=root,
                                  **extra)
            flow.initialize()
            # MONAI's required properties, each resolvable (BundleWorkflow's check; ConfigWorkflow's adds a check of
            # optional references that fails on inline handler lists, which are valid configs)
            missing = BundleWorkflow.check_properties(flow)
            assert missing == [], (kind, missing)
        run(config_file=os.path.join(configs, "train.json"), bundle_root=root, datalist=datalist, epochs=1)
        done[bundle].append("train")
with open(os.path.join(work, "done.json"), "w") as f:
    json.dump(done, f)
"""


def _weights(bundle: str, target: Path) -> Path:
    """A state dict of the bundle's ``network_def`` at its default profile (stands in for trained weights)."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), target)
    return target


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("export")
    cohort = make_cohort(work / "cohort", cases=4, seed=0, size=(32, 64, 64))
    images = work / "images"
    images.mkdir()
    for case in ("case_0000", "case_0001"):
        for volume in ("t2w", "adc"):
            name = f"{case}_{volume}.nii.gz"
            (images / name).write_bytes((cohort.parent / case / name).read_bytes())
    plan = {}
    for bundle in BUNDLES:
        weights = None if bundle in PRETRAIN else _weights(bundle, work / f"{bundle}.pt")
        export_bundle(bundle, work / "export", weights=weights, torchscript=False)
        plan[bundle] = ["net"] if bundle in PRETRAIN else ["net", "inference"]
    plan[TRAINED].append("train")
    export_bundle("tools", work / "export")
    plan["vfm_analysis"] = []
    outside = work / "outside"
    outside.mkdir()
    script = outside / "run_outside.py"
    script.write_text(OUTSIDE)
    proc = subprocess.run([sys.executable, str(script), str(REPO), str(work), str(images), str(cohort),
                           json.dumps(plan)], cwd=outside, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"work": work, "images": images, "plan": plan, "done": json.loads((work / "done.json").read_text())}


@pytest.mark.slow
def test_every_bundle_is_verified_and_predicts_outside_the_repository(exported: dict) -> None:
    assert set(exported["done"]) == set(BUNDLES) | {"vfm_analysis"} and len(BUNDLES) == 27
    assert exported["done"] == {b: ["metadata", *steps] for b, steps in exported["plan"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b not in PRETRAIN])
def test_predictions_land_on_the_input_grid(exported: dict, bundle: str) -> None:
    folder = exported["work"] / "predictions" / bundle
    source = nib.load(exported["images"] / "case_0001_t2w.nii.gz")
    if "classification" in bundle:
        rows = (folder / "predictions.csv").read_text().splitlines()
        assert rows[0].startswith("id,p0,p1,p2,p3,class") and [r.split(",")[0] for r in rows[1:]] == [
            "case_0000",
            "case_0001",
        ]
        return
    name = "case_0001_lesion.nii.gz" if "segmentation" in bundle else "case_0001_pred.nii.gz"
    pred = nib.load(folder / name)
    slices = 2 if "super_resolution" in bundle else 1
    assert pred.shape == (*source.shape[:2], source.shape[2] * slices)
    assert torch.allclose(torch.as_tensor(pred.affine[:3, :2]), torch.as_tensor(source.affine[:3, :2]), atol=1e-5)


@pytest.mark.slow
def test_an_exported_bundle_trains_on_a_datalist(exported: dict) -> None:
    run = exported["work"] / "export" / TRAINED / "results" / "runs" / TRAINED / "seed0"
    assert (run / "models" / "model.pt").is_file() and (run / "test" / "predictions.npz").is_file()


def test_macros_are_resolved_recursively_and_a_bad_one_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"x": {"y": [1, "%b.json#z"]}}))
    (tmp_path / "b.json").write_text(json.dumps({"z": {"w": 2}}))
    assert resolve_macros({"k": "%a.json#x#y"}, tmp_path) == {"k": [1, {"w": 2}]}
    with pytest.raises(ExportError, match="macro '%b.json#nope': b.json has no nope"):
        resolve_macros("%b.json#nope", tmp_path)


def test_the_carried_code_is_the_closure_of_what_the_configs_name() -> None:
    names = named_modules([{"_target_": "common.networks.ProFoundDense", "x": "$common.bundle.load_trained(@n)"}])
    assert names == ["common.bundle", "common.networks"]
    files = {p.relative_to(REPO).as_posix() for p in module_closure(names)}
    assert {"common/__init__.py", "common/networks/profound.py", "common/bundle/plain.py", "common/tasks.py"} <= files
    assert not any(f.startswith(("common/analysis/", "tools/")) for f in files)  # nothing it does not reach


def test_unknown_bundles_and_runs_get_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no bundle 'nope'.*unet_segmentation"):
        export_bundle("nope", tmp_path)
    with pytest.raises(ExportError, match="has no models/model.pt"):
        export_bundle("unet_segmentation", tmp_path, run_dir=tmp_path)


@pytest.mark.slow
def test_the_same_inputs_give_the_same_zip_and_a_torchscript_model(tmp_path: Path) -> None:
    weights = _weights("profound_classification_scratch", tmp_path / "w.pt")
    zips = [export_bundle("profound_classification_scratch", tmp_path / o, weights=weights, make_zip=True)
            for o in ("a", "b")]  # fmt: skip
    assert zips[0].read_bytes() == zips[1].read_bytes()
    model = torch.jit.load(tmp_path / "a" / "profound_classification_scratch" / "models" / "model.ts")
    assert model(torch.zeros(2, 1, 64, 64, 32)).shape == (2, 4)


@pytest.mark.slow
def test_a_run_export_carries_its_results_and_is_logged_to_its_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from common.bundle import sqlite_uri

    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    tags = {"metric_name": "dice", "profile": "smoke", "seed": "0", "regime": "specialised"}
    experiment = client.create_experiment("vfm-study", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, tags=tags).info.run_id
    client.log_metric(run_id, "test_metric", 0.25)
    client.log_metric(run_id, "baseline_metric", 0.0)
    run_dir = tmp_path / "runs" / "unet_segmentation" / "seed0"
    (run_dir / "models").mkdir(parents=True)
    _weights("unet_segmentation", run_dir / "models" / "model.pt")
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    archive = export_bundle("unet_segmentation", tmp_path / "out", run_dir=run_dir, make_zip=True, torchscript=False)
    metadata = json.loads((tmp_path / "out" / "unet_segmentation" / "configs" / "metadata.json").read_text())
    assert metadata["test_results"] == {"run_id": run_id, "metric": "dice", "test_metric": 0.25,
                                        "baseline_metric": 0.0, "profile": "smoke", "seed": "0",
                                        "regime": "specialised"}  # fmt: skip
    readme = (tmp_path / "out" / "unet_segmentation" / "docs" / "README.md").read_text()
    assert "test dice = 0.2500; the task's strongest trivial baseline scores 0.0000" in readme
    assert "## Commands" not in readme and "## Using this bundle" in readme
    assert [a.path for a in client.list_artifacts(run_id, "export")] == [f"export/{archive.name}"]
