"""Plot a training run and compare runs (the original reference's analysis step).

    python scripts/analyze_training.py --run_dir runs/demo [--compare runs/a runs/b] [--out runs/demo/plots]

Reads each run's metrics.csv (long form, pivoted), run.json and eval.json; writes PNG plots
(loss, bits per byte, learning rate, gradient norms, ternary code shares and H-Net
compression when logged) plus comparison.md / comparison.json. The logic lives in
`simplified_slm.evaluation.analysis`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from simplified_slm.errors import SLMError  # noqa: E402
from simplified_slm.evaluation.analysis import analyze_runs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", "--run-dir", required=True, help="the run to plot (its output_dir)")
    p.add_argument("--compare", nargs="*", default=[], metavar="DIR", help="more runs for the comparison table")
    p.add_argument("--out", help="output folder (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        result = analyze_runs([args.run_dir, *args.compare], args.out)
    except SLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in result["plots"]:
        print(path)
    print(result["table"])
    print(Path(result["table"]).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
