"""Seed 000's entry point: `python generate.py --model_path ... --prompt ...` (same as `slm generate`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from simplified_slm.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
