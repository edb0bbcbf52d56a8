"""Build the tokenizer shipped in letterpress/assets/tiny_code/ from the Python standard library.

Usage: python scripts/build_tokenizer.py [--out DIR]

The json, email and http packages are left out: they are held out to evaluate the small model later.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from letterpress.train.bpe import read_source, stdlib_python_files, train_bpe  # noqa: E402

VOCAB_SIZE = 4096
HELD_OUT = ("json", "email", "http")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "letterpress" / "assets" / "tiny_code")
    args = parser.parse_args()

    files = stdlib_python_files(exclude=HELD_OUT)
    out_dir = train_bpe((read_source(f) for f in files), VOCAB_SIZE, args.out)
    tokenizer_json = out_dir / "tokenizer.json"
    digest = hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
    print(f"trained on {len(files)} files (Python {sys.version.split()[0]}); wrote {out_dir}")
    print(f"tokenizer.json: {tokenizer_json.stat().st_size} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
