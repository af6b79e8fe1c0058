"""End-to-end experiment (the original reference's pipeline): prepare, train, evaluate, analyze.

    python scripts/run_experiment.py --config configs/default.json [--set train.max_steps=500]
        [--output_dir runs/x] [--compare runs/baseline ...]

Runs `slm run` (prepare the data, train, evaluate the best checkpoint on the whole
validation split into <run>/eval.json), then writes the plots and the comparison table into
<run>/plots (`simplified_slm.evaluation.analysis`). Extra runs given with --compare join
the table and the comparison plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from simplified_slm.cli.main import EXIT_USER_ERROR, build_parser  # noqa: E402
from simplified_slm.cli.main import main as slm_main  # noqa: E402
from simplified_slm.errors import SLMError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--compare", nargs="*", default=[], metavar="DIR")
    p.add_argument("-h", "--help", action="store_true")
    own, rest = p.parse_known_args(argv)
    if own.help:
        print(__doc__)
        build_parser().parse_args(["run", "--help"])  # prints `slm run`'s options and exits
    try:
        from simplified_slm.cli.main import _experiment

        run_args = build_parser().parse_args(["run", *rest])
        run_dir = Path(_experiment(run_args).output_dir)
    except SLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    code = slm_main(["run", *rest])
    if code != 0:
        return code
    from simplified_slm.evaluation.analysis import analyze_after_run

    # `slm run` may already have written the plots; redo them only when stale or comparing
    table, evaluated = run_dir / "plots" / "comparison.json", run_dir / "eval.json"
    fresh = table.is_file() and evaluated.is_file() and table.stat().st_mtime >= evaluated.stat().st_mtime
    if own.compare or not fresh:
        analyze_after_run(run_dir, print, compare=own.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
