"""The README's commands and its Python example keep working."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert README.index("```bash") < 20
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "quiver demo" in (ROOT / "scripts" / "demo.sh").read_text()


def test_readme_python_example_runs_on_the_tiny_model(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    code = code.replace('"smollm2-135m"', '"tiny-llama"')
    code = code.replace("steps=300", "steps=2, eval_every=1, max_length=64, eval_examples=8")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "spell-peft" / "adapter_model.safetensors").exists()
    from quiver import Library

    assert Library(str(tmp_path / "lib")).names() == ["spell", "spell-copy"]
