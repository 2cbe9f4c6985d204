"""The commands and code the README and docs/ show are ones that run: every ``weightbias`` line
parses with the CLI's own parser, every ``python scripts/X.py`` line names a script that takes
each flag it is given, every example spec or script a command names exists, and every
``modelzoo.X`` / ``detector.X`` / ``fairtrain.X`` a Python block uses is public API.

Usage notation (``[--json]``) counts as the flags inside it; shell operators split a line into
its commands, and a redirect ends one.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

import detector
import fairtrain
import modelzoo
from detector.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
OPERATORS = ";&|<>"


def code_blocks(text: str, languages: set[str]) -> Iterator[str]:
    """The bodies of the fenced code blocks marked as one of ``languages``."""
    language, lines = None, []
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if language is None:
                language, lines = line.strip()[3:].strip() or "text", []
            else:
                if language in languages:
                    yield "\n".join(lines)
                language = None
        elif language is not None:
            lines.append(line)


def shell_commands(block: str) -> Iterator[list[str]]:
    """Each command of a block as its words, continuation lines joined, comments dropped."""
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(?<!\S)[12]>", ">", line.replace("[", " ").replace("]", " "))  # 2> names a stream
        lexer = shlex.shlex(line, posix=True, punctuation_chars=OPERATORS)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        redirected = False
        for token in lexer:
            if set(token) <= set(OPERATORS):
                if words:
                    yield words
                words, redirected = [], bool(set(token) & set("<>"))
            elif not redirected:
                words.append(token)
        if words:
            yield words


def documented_blocks(languages: set[str]) -> list[tuple[str, str]]:
    """(file name, block) for every such block in the README and docs/."""
    return [(path.name, block) for path in DOCS
            for block in code_blocks(path.read_text(encoding="utf-8"), languages)]


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(where, words) for where, block in documented_blocks(SHELL) for words in shell_commands(block)]


def test_the_docs_show_commands_of_both_kinds() -> None:
    commands = [words for _, words in documented_commands()]
    assert sum(words[0] == "weightbias" for words in commands) >= 30
    assert sum(any(w.startswith("scripts/") for w in words) for words in commands) >= 20


@pytest.mark.parametrize("where, words", [(where, words) for where, words in documented_commands()
                                          if words[0] == "weightbias"],
                         ids=lambda value: value if isinstance(value, str) else " ".join(value[1:4]))
def test_every_documented_weightbias_command_parses(where: str, words: list[str]) -> None:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(words[1:])
    except SystemExit as exit_:
        assert not exit_.code, f"{where}: {' '.join(words)}\n{errors.getvalue()}"
    for word in words:
        if word.startswith("examples/"):
            assert (ROOT / word).is_file(), f"{where}: {word} does not exist"


def test_every_documented_script_exists_and_takes_its_flags() -> None:
    problems = []
    for where, words in documented_commands():
        for script in (w for w in words if w.startswith("scripts/") and w.endswith((".py", ".sh"))):
            path = ROOT / script
            if not path.is_file():
                problems.append(f"{where}: {script} does not exist")
            elif path.suffix == ".py":
                source = path.read_text(encoding="utf-8")
                problems += [f"{where}: {script} takes no {flag}" for flag in
                             (w.split("=")[0] for w in words if w.startswith("--"))
                             if f'"{flag}"' not in source]
    assert not problems, "\n".join(problems)


def test_every_package_name_a_documented_python_block_uses_is_public_api() -> None:
    packages = {"modelzoo": modelzoo, "detector": detector, "fairtrain": fairtrain}
    used = set()
    for where, block in documented_blocks({"python"}):
        used |= {(where, package, name)
                 for package, name in re.findall(r"\b(modelzoo|detector|fairtrain)\.([A-Za-z_]\w*)", block)}
        for package, names in re.findall(r"^from (modelzoo|detector|fairtrain) import (.+)$", block, re.M):
            used |= {(where, package, name.strip(" ()")) for name in names.split(",")}
    assert len(used) >= 20
    missing = [f"{where}: {package}.{name}" for where, package, name in sorted(used)
               if name not in packages[package].__all__]
    assert not missing, missing
