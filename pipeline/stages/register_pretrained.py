"""register_pretrained stage: the model shipped in the package as a version of `idm` in MLflow.

Output: models/shipped/registered.json (model name, version, sha256). The version is
tagged source=pretrained and sha256=<the weights'>, with the alias `pretrained`. A
version with the same sha256 already in the registry is reused, so rerunning the
stage (or `make run` on another day) does not register the same weights twice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idm.files import atomic_path
from idm.pretrained import manifest, weights
from pipeline.registry import PRETRAINED as ALIAS
from pipeline.stages import run


def register(out: Path) -> dict:
    """Register (or find) the shipped weights' version; write and return its record."""
    import mlflow

    from pipeline.mlflow_model import log_and_register
    from pipeline.tracking import MODEL_NAME, setup, stage_run

    setup()
    path, record = weights(), manifest()  # verified before anything is registered
    client = mlflow.MlflowClient()
    same = client.search_model_versions(f"name='{MODEL_NAME}' and tag.sha256='{record['sha256']}'")
    if same:
        version = str(max(int(v.version) for v in same))
    else:
        with stage_run("register_pretrained", tags={"source": "pretrained"}):
            version = log_and_register(path, tags={"source": "pretrained", "sha256": record["sha256"],
                                                   "steps": str(record["steps"])},
                                       description=f"The weights shipped in the package (idm/weights, sha256 "
                                                   f"{record['sha256'][:12]}), {record['steps']} steps of "
                                                   "`make pretrain` (recipes/pretrain.yaml); see MODEL_CARD.md.")
    client.set_registered_model_alias(MODEL_NAME, ALIAS, version)
    result = {"model_name": MODEL_NAME, "version": version, "alias": ALIAS, "sha256": record["sha256"]}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models") / "shipped" / "registered.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = register(args.out)
    print(f"the shipped model is {result['model_name']} version {result['version']} (alias {ALIAS})")


if __name__ == "__main__":
    run(main)
