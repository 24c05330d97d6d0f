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


def _links(text: str) -> list[str]:
    """Targets of the Markdown links in `text` (inline links, not images' alt text)."""
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_readme_link_stays_in_the_repository_and_exists():
    """README.md, docs/ and benchmarks/README.md link only to files of this repository."""
    for page in [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
                 *sorted((ROOT / "docs").glob("*.md"))]:
        for target in _links(page.read_text()):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
            assert path.exists(), f"{page.name} links to a missing file: {target}"


# A figure: a number with a decimal point, one followed by x or %, or one of 3 digits or more
# (smaller counts are too common to pin to one file).
_FIGURE = re.compile(r"[-+]?\d[\d,]*\.\d+|\d+(?=x\b|%)|\d{1,3}(?:,\d{3})+|\d{3,}")


def test_figures_in_the_readme_results_match_their_results_files():
    """Each bullet of README's Results quotes figures that appear, as written, in a results
    file it links to (the .md or its .json twin)."""
    section = README.split("## Results", 1)[1].split("\n## ", 1)[0]
    bullets = [b for b in re.split(r"\n- ", section)[1:]]
    assert len(bullets) >= 5
    for bullet in bullets:
        files = [ROOT / t for t in _links(bullet) if t.startswith("benchmarks/results/")]
        assert files, f"a results bullet links no results file: {bullet[:60]}"
        sources = "".join(f.read_text() + _twin(f) for f in files).replace(",", "")
        for figure in _FIGURE.findall(bullet):
            plain = figure.replace(",", "")
            assert plain in sources, f"{figure} is not in {[f.name for f in files]}"


def _twin(path: Path) -> str:
    json = path.with_suffix(".json")
    return json.read_text() if json.exists() else ""
