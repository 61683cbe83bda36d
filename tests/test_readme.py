"""The README as a new user copies it: its Python runs verbatim, its commands parse.

Issue 20: the embedding example used to raise ``NameError: PKI`` when copied. Every
```python block of README.md runs here, unchanged, in a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs_as_copied(index: int, tmp_path: Path) -> None:
    code = _blocks("python")[index]
    script = tmp_path / f"readme_{index}.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, f"README python block {index} failed:\n{code}\n{r.stderr[-3000:]}"
    if "ut.Server(" in code:  # the embedding example really carries datagrams
        assert "WireGuard endpoint: ('127.0.0.1'," in r.stdout, r.stdout
        assert "100 of 100 datagrams came back" in r.stdout, r.stdout


def test_readme_has_an_embedding_example_that_checks_itself() -> None:
    blocks = _blocks("python")
    assert blocks, "README.md lost its python blocks"
    emb = [b for b in blocks if "ut.Server(" in b and "ut.Client(" in b]
    assert emb and "pki.init_pki(" in emb[0], "the embedding example must make its own PKI"


def test_readme_commands() -> None:
    """The two commands are there, and every `ut-tunnel ...` line parses."""
    from ut.cli import build_parser

    sh = _blocks("sh")
    assert "bash .ci/run\n" in sh
    assert any(".venv/bin/pip install ." in b and ".venv/bin/ut-tunnel demo" in b for b in sh)
    assert (ROOT / ".ci" / "run").is_file()
    seen = 0
    for block in sh:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^(sudo |\S*/bin/)", "", line)
            for part in re.split(r"\s&&\s", line):
                part = re.sub(r"^\S*/bin/", "", part.strip())
                if not part.startswith("ut-tunnel ") or "--version" in part:
                    continue
                try:
                    build_parser().parse_args(shlex.split(part)[1:])
                except SystemExit as exc:
                    pytest.fail(f"README.md: `{part}` does not parse (exit {exc.code})")
                seen += 1
    assert seen >= 5, seen
