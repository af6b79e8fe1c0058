"""The original reference's entry point: `python generate.py --model_path ... --prompt ...` (= `slm generate`).

That reference runs `python generate.py --prompt ...` on a fresh clone, so this wrapper passes
`--untrained`: without --model_path and without a trained model under runs/ it samples
from an untrained model (with a warning) where `slm generate` refuses.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from simplified_slm.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", "--untrained", *sys.argv[1:]]))
