"""The documentation stays true to the code: its links resolve, and the example configuration
is what it says it is (it loads with the trainer's own loader, so it cannot rot)."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from qualiclip.train_config import PRESETS, TrainConfig, load_config

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
EXAMPLE = REPO_ROOT / "docs" / "examples" / "train-open.toml"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def local_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_local_link_reaches_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in local_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: {broken}"


def test_slugs_follow_github() -> None:
    assert slug("HTML report (`score --report`)") == "html-report-score---report"
    assert slug("The web page: `qualiclip serve`") == "the-web-page-qualiclip-serve"
    assert slug("Degradations in the DataLoader workers: `data.degrade_in = \"loader\"`") == (
        "degradations-in-the-dataloader-workers-datadegrade_in--loader")


def test_the_readme_links_a_page_for_each_of_its_sections() -> None:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(sections) >= 8
    for section in sections:
        title = section.splitlines()[0]
        assert re.search(r"\]\(docs/[\w/.-]+\.md", section), f"README {title!r}: no docs link"


def _keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _fields(cls: type, prefix: str = "") -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            names |= _fields(type(default), f"{prefix}{f.name}.")
        else:
            names.add(f"{prefix}{f.name}")
    return names


def test_the_example_configuration_is_the_open_preset() -> None:
    assert load_config(EXAMPLE) == PRESETS["open"]


def test_the_example_configuration_spells_out_every_key() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    with open(EXAMPLE, "rb") as fh:
        table = tomllib.load(fh)
    assert _keys(table) == _fields(TrainConfig)


def test_the_example_configuration_is_checked_like_any_other(tmp_path: Path) -> None:
    """The loader refuses a misspelt key in a copy of it: the example cannot drift silently."""
    text = EXAMPLE.read_text(encoding="utf-8").replace("warmup_steps =", "warmup_step =")
    copy = tmp_path / "bad.toml"
    copy.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="warmup_step"):
        load_config(copy)
