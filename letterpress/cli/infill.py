"""`letterpress infill FILE [MODEL] --line N`: fill the gap marked at line N (`...` or `# fill`); the work is
`LLM.infill`. Prints the whole resulting file to stdout (or writes it back with --in-place) and a stats line to
stderr. The file helpers here are shared with `letterpress edit` (cli/edit.py)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.args import (add_model_arguments, add_sampling_arguments, check_model_arguments, check_sampling_arguments,
                           llm_from_args, sampling_params)
from ..errors import RequestError

HELP = "fill a marked gap (a `...` or `# fill` line) in a file"
# letterpress.infill's, repeated so that parsing imports no torch (tests/test_cli.py checks they agree)
STRATEGIES = ("search", "slack", "prompt")
DEFAULT_STRATEGY = "search"


def add_file_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the source file")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder or Hub id (default: embedded model)")
    p.add_argument("--in-place", action="store_true", help="write the result back to FILE instead of printing it")
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_file_arguments(p)
    p.add_argument("--line", type=int, required=True, help="1-based line holding only `...` or a `# fill` comment")
    p.add_argument("--max-middle-tokens", type=int, default=None, help="budget of the middle (default: half a canvas)")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                   help=f"how the middle's length is found (default {DEFAULT_STRATEGY}; README, 'Infilling and editing')")


def load(args: argparse.Namespace):
    return llm_from_args(args.model, args, max_num_seqs=8)


@dataclass(frozen=True)
class SourceFile:
    """A file as the model and --line / --span see it (line ends read as "\n", no byte-order mark), and how
    to write it back as it was: its line end, its BOM."""

    path: str
    text: str
    newline: str  # "\n", "\r\n" or "\r"; the first kind found
    mixed: bool  # more than one kind of line end
    bom: bool

    def encoded(self, text: str, bom: bool) -> bytes:
        return (UTF8_BOM if bom and self.bom else b"") + text.replace("\n", self.newline).encode("utf-8")


UTF8_BOM = b"\xef\xbb\xbf"


def read(path: str) -> SourceFile:
    """The file's text with its line ends read as "\n" and a UTF-8 byte-order mark set aside (an editor's
    character offsets and line 1 do not count it); `emit` writes both back."""
    try:
        raw = Path(path).read_bytes()
        bom = raw.startswith(UTF8_BOM)
        text = raw[len(UTF8_BOM) if bom else 0:].decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read {path}: {e}") from e
    crlf, cr, lf = text.count("\r\n"), text.count("\r") - text.count("\r\n"), text.count("\n") - text.count("\r\n")
    kinds = [end for end, n in (("\r\n", crlf), ("\r", cr), ("\n", lf)) if n]
    return SourceFile(path, text.replace("\r\n", "\n").replace("\r", "\n"), kinds[0] if kinds else "\n",
                      len(kinds) > 1, bom)


def check_in_place(path: str) -> None:
    """--in-place before the model loads: a file it may replace whole (its folder takes the temporary file),
    one name for its contents, and one line end (a mixed file would come back with one kind everywhere)."""
    import os

    target = Path(path).resolve()
    if not target.is_file():
        return  # read() says what is wrong with it
    if not os.access(target, os.W_OK):
        raise RequestError(f"{path} is read-only: --in-place would replace it (print to standard output instead)")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise RequestError(f"cannot write beside {path} (its folder is read-only): --in-place writes a temporary "
                           "file there and renames it over the file; print to standard output instead")
    if target.stat().st_nlink > 1:
        raise RequestError(f"{path} has {target.stat().st_nlink} hard links: --in-place would give only this name "
                           "the new text; print to standard output instead")
    if read(path).mixed:
        raise RequestError(f"{path} mixes line ends (CRLF, CR, LF): --in-place would write one kind everywhere; "
                           "make them one kind first, or print to standard output")


def write_in_place(source: SourceFile, text: str) -> None:
    """Replace the file in one step: the text goes to a temporary file beside it (same mode, owner where this
    process may set it, line ends and BOM), then takes its name, so a full disk or a Ctrl-C leaves the old file
    whole instead of a truncated one."""
    import os
    import tempfile

    target = Path(source.path).resolve()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with open(fd, "wb") as f:
            f.write(source.encoded(text, bom=True))
        info = target.stat()
        os.chmod(tmp, info.st_mode & 0o7777)
        try:
            os.chown(tmp, info.st_uid, info.st_gid)
        except OSError:  # not ours to give away: the file keeps this process's owner, as any editor's save does
            pass
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise RequestError(f"cannot write {source.path}: {e.strerror or e}; the file is unchanged") from None
        raise


def emit(args: argparse.Namespace, source: SourceFile, text: str, stats: str) -> int:
    """The result to the file (--in-place) or to standard output, with the file's line ends (a pipe back into
    an editor's buffer keeps CRLF; the BOM stays the file's, not the buffer's)."""
    if args.in_place:
        write_in_place(source, text)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(source.encoded(text, bom=False))
        sys.stdout.buffer.flush()
    print(stats, file=sys.stderr)
    return 0


def check(args: argparse.Namespace) -> None:
    """Before torch loads (cli.main): MODEL, --dtype and the sampling flags (infill's and edit's)."""
    check_model_arguments(args.model, args)
    check_sampling_arguments(args)
    if args.in_place:
        check_in_place(args.file)


def run(args: argparse.Namespace) -> int:
    from ..infill import LineGap

    source = read(args.file)
    gap = LineGap.marked(source.text, args.line)  # checked before the model loads
    llm = load(args)
    start = time.perf_counter()
    out = llm.infill(gap.prefix, gap.suffix, args.max_middle_tokens, sampling_params(args), strategy=args.strategy)
    return emit(args, source, gap.fill(out.middle),
                f"[{out.strategy}: middle of {out.middle_tokens} tokens (budget {out.length}), "
                f"{out.steps} steps, {out.decoder_passes} row passes, {out.tokens_per_forward:.2f} tokens/forward, "
                f"{time.perf_counter() - start:.1f} s]")
