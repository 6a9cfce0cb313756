"""Write the run's self-contained report.html (figures embedded, readable offline): data,
training history, evaluation, calibration, fairness, Grad-CAM, error clusters and age.

    faceattrs report --run runs/paper
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--run", "--model", dest="run", required=True, metavar="RUN", help="run folder")


def run(args) -> int:
    from ..report import build_report

    print(build_report(args.run))
    return 0
