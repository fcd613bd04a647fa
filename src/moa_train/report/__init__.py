"""``moa-report <sweep dir>``: one results table (markdown + CSV) and a bar chart for a sweep.

A sweep is what ``moa-train -m experiment=a,b seed=0,125,1225 ...`` leaves in
``multirun/<date>/<time>/``: one folder per job with ``.hydra/overrides.yaml`` and, when the job
finished, ``summary.json``. Jobs are grouped into methods by their overrides without ``seed=``; the
overrides every job shares are printed once above the table. Per method the report gives:

- the trainable-parameter count,
- the accuracy per dataset and the unweighted mean over datasets (the paper's convention), each as
  mean ± sample std over the completed seeds,
- the training throughput (tokens/s) and the peak memory, when the trainer recorded them.

Accuracies come from the newest ``moa-eval`` results found inside a job (``<job>/final/eval/<preset>/
results.json``, choose one with ``--eval NAME``), else from the trainer's final evaluation
(``final_eval_predictions.jsonl`` + ``summary.json``). Partial sweeps work: jobs without a summary
(failed, or still running) are listed under the table with the reason found in their folder, never
dropped silently. A single mixed dataset (such as ``arith_mix``) is split into its tasks. A
moa-eval evaluation of the base model in ``<sweep dir>/base_model/`` (or ``--base``) becomes the
first row. Outputs (into the first sweep dir, or ``--out``): ``report.md``, ``report.csv`` (one row
per method), ``report_jobs.csv`` (one row per job) and ``report.png``.

Every launcher's and sweeper's folders read the same way: the basic and joblib launchers and Optuna
leave numbered job folders, ``submitit_local`` / ``submitit_slurm`` add ``.submitit/<job id>/`` logs
(the reason of a job killed from outside is read there), and for an Optuna sweep the report adds the
trials (searched parameters, objective, status) and the best parameters of
``optimization_results.yaml`` (``report_trials.csv``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from moa_train.errors import ArgumentParser, entry_point
from moa_train.report.jobs import BASE_LABEL, Job, ReportError, find_jobs, read_base, read_job, task_map_for
from moa_train.report.methods import Method, group_methods, mean_std, method_labels
from moa_train.report.render import Report, write_report
from moa_train.report.sweeps import Study, read_study

__all__ = [
    "Job",
    "Method",
    "Report",
    "ReportError",
    "Study",
    "build_report",
    "main",
    "mean_std",
    "write_report",
]


def build_report(roots: list[Path], eval_name: str | None = None, base: Path | None = None) -> Report:
    job_dirs = [(root, d) for root in roots for d in find_jobs(root)]
    if not job_dirs:
        raise ReportError(
            f"no job folders (with .hydra/overrides.yaml or summary.json) under {', '.join(map(str, roots))}"
        )
    task_map = task_map_for([d for _, d in job_dirs])
    jobs = [read_job(d, root, eval_name, task_map) for root, d in job_dirs]
    common = method_labels(jobs)
    methods = group_methods(jobs)
    base_job = None
    for candidate in [base] if base is not None else [r / "base_model" for r in roots]:
        base_job = read_base(candidate, task_map)
        if base_job is not None:
            break
    if base is not None and base_job is None:
        raise ReportError(f"--base {base}: no moa-eval results.json with per-dataset accuracy there")
    if base_job is not None:
        datasets = sorted({d for j in [*jobs, base_job] for d in j.datasets})
        methods = [Method(BASE_LABEL, [base_job], datasets)] + [
            Method(m.label, m.jobs, datasets) for m in methods
        ]
    studies = [s for root in roots if (s := read_study(root, jobs)) is not None]
    return Report(roots, jobs, common, methods, studies)


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="moa-report",
        description="Tabulate a moa-train sweep: per method, accuracy per dataset (mean ± std over seeds), "
        "trainable params, tokens/s, peak memory; failed jobs are listed. Writes report.md, report.csv, "
        "report_jobs.csv and report.png.",
    )
    parser.add_argument(
        "sweep_dirs", nargs="+", type=Path, help="sweep folder(s), e.g. multirun/<date>/<time>"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the first sweep folder)"
    )
    parser.add_argument(
        "--eval", dest="eval_name", default=None, help="use moa-eval results of this preset only"
    )
    parser.add_argument(
        "--base", type=Path, default=None,
        help="moa-eval results of the base model (default: <sweep dir>/base_model/ when present)",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="skip the bar chart")
    args = parser.parse_args(argv)
    try:
        report = build_report(list(args.sweep_dirs), args.eval_name, args.base)
        paths = write_report(report, args.out or args.sweep_dirs[0], plot=not args.no_plot)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(report.markdown().split("\n## Jobs")[0].rstrip())
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
