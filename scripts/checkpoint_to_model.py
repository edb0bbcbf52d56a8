"""Write a resume checkpoint of `letterpress train` (torch.distributed.checkpoint) as a model folder that
`letterpress generate` and the benchmarks load: the checkpoint's weights in the config, tokenizer and
generation_config.json of BASE, a model folder of the same run (or of the same shape and tokenizer).

    python scripts/checkpoint_to_model.py runs/x/checkpoints/step-0001750 runs/x/model runs/x-1750

How BENCHMARKS.md scores a run at its intermediate steps (e.g. "Compute probe").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import model_from_resume_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a resume checkpoint folder (runs/x/checkpoints/step-N)")
    ap.add_argument("base", help="a model folder of the same shape and tokenizer (runs/x/model)")
    ap.add_argument("out", help="the model folder to write")
    args = ap.parse_args()
    from letterpress.checkpoint import save_model
    from letterpress.embedded import TOKENIZER_FILES

    base, checkpoint = Path(args.base), Path(args.checkpoint)
    for folder, what in ((base / "config.json", "BASE has no config.json"), (checkpoint, "no such CHECKPOINT")):
        if not folder.exists():
            ap.error(f"{what}: {folder}")
    net, (missing, unexpected) = model_from_resume_checkpoint(checkpoint, base)
    if unexpected or any(not k.startswith("vision") for k in missing):
        sys.exit(f"error: {checkpoint} does not fit {base}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    generation = base / "generation_config.json"
    save_model(net, args.out, json.loads((base / "config.json").read_text("utf-8")),
               json.loads(generation.read_text("utf-8")) if generation.is_file() else None,
               extra_files={n: base / n for n in TOKENIZER_FILES if (base / n).is_file()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
