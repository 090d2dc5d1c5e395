"""The README's Python blocks run as written: in order, in one namespace, as a reader pastes them.

On the embedded default they take about a minute on this CPU, so the fast test runs them on a tiny
model: the one substitution is that every ``"smollm2-135m"`` given to ``load_model`` /
``from_pretrained`` names a tiny random Llama directory instead (4 layers, a word-level tokenizer);
nothing else changes. The shipped drafters' checkpoint names (``"eagle-smollm2-135m"``, ...) are
left alone: those blocks build them, and only the real target may run them. The slow test runs the
blocks verbatim on the real model.
"""

import re
from pathlib import Path

import pytest

from conftest import save_with_tokenizer, tiny_llama

README = Path(__file__).resolve().parent.parent / "README.md"
EMBEDDED = '"smollm2-135m"'


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def run_blocks(blocks: list[str]) -> dict:
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    return namespace


@pytest.mark.smoke
def test_readme_has_python_blocks():
    blocks = python_blocks()
    assert blocks and any("specdec.generate(" in b for b in blocks)


@pytest.mark.smoke
def test_readme_python_blocks_run_on_a_tiny_model(tmp_path, capsys):
    tiny = save_with_tokenizer(tiny_llama(layers=4), tmp_path / "tiny")
    blocks = python_blocks()
    assert sum(b.count(EMBEDDED) for b in blocks) >= 2  # the convention above still matches the README
    run_blocks([b.replace(EMBEDDED, repr(str(tiny))) for b in blocks])
    assert capsys.readouterr().out.strip()  # the print and the streamer wrote something


@pytest.mark.slow
@pytest.mark.smoke
def test_readme_python_blocks_run_verbatim(capsys):
    run_blocks(python_blocks())
    assert capsys.readouterr().out.strip()
