"""The docs as a user meets them: every relative link points at a file that exists, every documented `ctssl`
command parses with the real command line, and every documented `snakemake` command is accepted by Snakemake
(`-n`, a dry run) on the config it names, so a command that the tools reject fails CI, not the user."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ctssl.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"^(?:\.venv/bin/)?(snakemake|ctssl)\s")
# Documented snakemake commands that a dry run cannot check here, with the reason.
NEEDS_MORE = {
    "--report": "renders an existing results folder (the workflow tests build one and run --report)",
    "my.yaml": "the user's own config (the one documented is checked by test_documented_configs_are_valid)",
}


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links that point into the repository (not web addresses or anchors of the page)."""
    return [t for t in LINK.findall(text) if not re.match(r"^(https?:|mailto:|#)", t)]


def test_link_extraction():
    text = "see [science](docs/science.md#4), [nnU-Net](https://github.com/MIC-DKFZ/nnUNet) and [top](#quick-start)"
    assert relative_links(text) == ["docs/science.md#4"]


def test_relative_links_resolve():
    broken = [f"{doc.relative_to(ROOT)}: {target}" for doc in DOCS for target in relative_links(doc.read_text())
              if not (doc.parent / target.split("#")[0]).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command line) for each `snakemake …` / `ctssl …` line of a fenced code block (the commands a user copies;
    inline code in prose names flags and fragments), comments and line continuations removed."""
    found = []
    for doc in DOCS:
        inside, lines = False, []
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("```"):
                inside = not inside
            elif inside:
                lines.append(line)
        for line in lines:
            line = line.split(" #")[0].strip()
            for part in re.split(r"\s*&&\s*", line):
                if COMMAND.match(part):
                    found.append((doc.name, part))
    return sorted(set(found))


def _placeholders(args: list[str]) -> list[str]:
    """Documented placeholders made concrete: `--cores N` -> 2."""
    return ["2" if a == "N" and i and args[i - 1] == "--cores" else a for i, a in enumerate(args)]


CTSSL = [(d, c) for d, c in documented_commands() if COMMAND.match(c)[1] == "ctssl"]
SNAKEMAKE = [(d, c) for d, c in documented_commands() if COMMAND.match(c)[1] == "snakemake"]


def test_docs_show_commands():
    assert CTSSL and len(SNAKEMAKE) >= 5  # the extraction itself works


@pytest.mark.parametrize(("doc", "command"), CTSSL)
def test_documented_ctssl_commands_parse(doc, command):
    args = _placeholders(shlex.split(command, comments=True)[1:])
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{command}` is refused by ctssl's command line (exit {exc.code})")


@pytest.mark.workflow
@pytest.mark.parametrize(("doc", "command"), SNAKEMAKE)
def test_documented_snakemake_commands_dry_run(doc, command):
    for flag, reason in NEEDS_MORE.items():
        if flag in command:
            pytest.skip(f"{reason}: `{command}`")
    args = _placeholders(shlex.split(command, comments=True)[1:])
    if "-n" not in args and "--dry-run" not in args:
        args.append("-n")
    run = subprocess.run([sys.executable, "-m", "snakemake", *args, "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"{doc}: `{command}` fails as a dry run:\n{(run.stdout + run.stderr)[-2000:]}"


def documented_configs() -> list[tuple[str, str]]:
    """(doc, YAML) of every fenced `yaml` block that is a whole study config (it has `datasets:`)."""
    blocks = []
    for doc in DOCS:
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S):
            if re.search(r"(?m)^datasets:", block):
                blocks.append((doc.name, block))
    return blocks


def test_docs_show_a_config():
    assert documented_configs()


@pytest.mark.parametrize(("doc", "block"), documented_configs(), ids=lambda v: v if len(v) < 40 else "config")
def test_documented_configs_are_valid(doc, block):
    """A config a user copies from the docs passes every check `snakemake -n` makes on it."""
    import yaml

    from ctssl.config import resolve_config
    from ctssl.errors import ConfigError

    try:
        resolve_config(yaml.safe_load(block))
    except ConfigError as exc:  # the example's own folders (/data/...) are placeholders: only they may be missing
        other = [line for line in str(exc).splitlines() if "does not exist (relative paths" not in line]
        if other:
            pytest.fail(f"{doc}: the documented config is refused:\n" + "\n".join(other))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", re.sub(r"[`*~]", "", text))
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M):
        slug = _slug(heading)
        seen[slug] = seen.get(slug, -1) + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, count in seen.items() for n in range(count + 1)}


def test_every_anchor_link_resolves():
    """`[text](file.md#section)` and `[text](#section)` in the README and docs/ point at a heading that exists (links
    to sections that moved once sent users to the top of a page)."""
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target, anchor in re.findall(r"\]\(([^)\s#]*\.md|)#([^)\s]+)\)", text):
            path = (doc.parent / target) if target else doc
            if not path.is_file() or anchor not in _anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: ({target}#{anchor})")
    assert not broken, "\n".join(broken)


def test_the_slug_rule_on_known_headings():
    assert _slug("Findings under converged fine-tuning (issue 24): what holds now") == \
        "findings-under-converged-fine-tuning-issue-24-what-holds-now"
    assert _slug("How CT-like are the synthetic domains (issue 35)") == "how-ct-like-are-the-synthetic-domains-issue-35"
    assert _slug("Output layout (the contract)") == "output-layout-the-contract"
