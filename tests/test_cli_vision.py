"""`letterpress generate / chat --image --video` on a tiny random checkpoint with a vision tower (in process)."""

from __future__ import annotations

import io
import sys

import pytest

pytest.importorskip("transformers")

from letterpress.cli import main  # noqa: E402
from letterpress.engine.runner import Runner  # noqa: E402

from .vision_fixtures import build_vision_checkpoint, png_bytes  # noqa: E402

FAST = ["--max-new-tokens", "8", "--max-denoising-steps", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_vision")
    build_vision_checkpoint(folder / "model")
    (folder / "a.png").write_bytes(png_bytes(60, 40, 1))
    (folder / "bad.png").write_bytes(b"nonsense")
    return folder


@pytest.fixture
def embedded(monkeypatch):
    """Counts the media runs each engine call encodes (the soft tokens that reach the model)."""
    seen = []
    original = Runner._media_features

    def spy(self, row):
        out = original(self, row)
        seen.append(len(out))
        return out

    monkeypatch.setattr(Runner, "_media_features", spy)
    return seen


@pytest.mark.parametrize("template", [[], ["--chat-template"]])
def test_generate_with_an_image(files, capsys, embedded, template):
    image = str(files / "a.png")
    assert main(["generate", str(files / "model"), "Describe:", "--image", image, "--image", image, *template, *FAST]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "[8 tokens" in out.err
    assert embedded == [2]


def test_chat_with_an_image(files, capsys, monkeypatch, embedded):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is it?\nand now?\n"))
    assert main(["chat", str(files / "model"), "--image", str(files / "a.png"), *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2
    # the image goes with the first question and stays in the conversation: each turn embeds it at most once
    # (none when the prefix cache still holds it)
    assert embedded[0] == 1 and all(n <= 1 for n in embedded)


@pytest.mark.parametrize("args,message", [
    (["--image", "BAD"], "--image {bad}: cannot read the image"),
    (["--image", "MISSING"], "not found"),
    (["--video", "BAD"], "--video {bad}: "),
    (["--image", "A", "--image", "A", "--limit-mm-per-prompt", '{"image": 1}'], "At most 1 image(s)"),
    (["--image", "A", "--mm-processor-kwargs", '{"max_soft_tokens": 3}'], "max_soft_tokens must be one of"),
])
def test_media_errors_are_one_line_exit_2(files, capsys, args, message):
    names = {"BAD": str(files / "bad.png"), "MISSING": str(files / "missing.png"), "A": str(files / "a.png")}
    args = [names.get(a, a) for a in args]
    assert main(["generate", str(files / "model"), "hi", *args, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(bad=files / "bad.png") in err[0], err


def test_text_only_model_refuses_an_image(files, capsys):
    assert main(["generate", "hi", "--image", str(files / "a.png"), *FAST]) == 2
    assert "no vision tower" in capsys.readouterr().err


def test_bad_limit_json_is_a_usage_error(files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(files / "model"), "hi", "--limit-mm-per-prompt", "{image: 1}"])
    assert e.value.code == 2 and "not JSON" in capsys.readouterr().err
