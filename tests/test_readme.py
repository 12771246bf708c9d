"""The README's Python snippets run as written, one after the other in one namespace, as a reader would paste them."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(snippets()) >= 2


@pytest.mark.slow
def test_readme_python_snippets_run_as_written():
    namespace: dict = {"__name__": "readme"}
    for number, code in enumerate(snippets(), 1):
        exec(compile(code, f"README.md snippet {number}", "exec"), namespace)
    prediction, radius = namespace["prediction"], namespace["radius"]
    assert prediction == -1 or 0 <= prediction < 10 and radius >= 0
    assert len(namespace["certs"]) == 4
