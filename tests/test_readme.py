"""The README's Python examples run as written."""
import re
from pathlib import Path

import moe_lab

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
        printed = capsys.readouterr().out.split()
        assert printed and float(printed[0]) < 1e-5, printed
    finally:
        if "my_backend" in moe_lab.available_backends():
            moe_lab.unregister("my_backend")


def test_readme_gives_the_two_setup_commands():
    text = README.read_text()
    assert "make lab" in text and "make test" in text
