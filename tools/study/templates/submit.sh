#!/bin/bash
# Submits the study written by `python -m tools.study --emit slurm` (README, "The study"): the pretraining array,
# the runs that need no pretrained weights at once, the finetune runs after the pretraining (afterok), and the
# analysis after all of them. Every task reports to MLFLOW_TRACKING_URI (default below).
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
PYTHON="${{PYTHON:-{python}}}"
export MLFLOW_TRACKING_URI="${{MLFLOW_TRACKING_URI:-{uri}}}"
mkdir -p {slurm_logs}
# the experiment is made once, before parallel tasks could race to make it (DESIGN.md section 5)
(cd {repo} && "$PYTHON" -c 'import sys; from common.bundle import ensure_experiment; \
ensure_experiment(sys.argv[1], sys.argv[2])' "$MLFLOW_TRACKING_URI" {study})
submit() {{ local id; id="$(sbatch --parsable "$@")"; echo "${{id%%;*}}"; }}
after=()
{body}deps="$(IFS=:; echo "${{after[*]}}")"
analysis="$(submit ${{deps:+--dependency=afterok:$deps}} "$here/analysis.sbatch")"
echo "analysis: job $analysis; report: {report}"
