"""The documents' commands: every `python cifar_hybrid_classifier.py ...` in README.md, RESULTS.md and
docs/ must parse (its options exist, its values are valid), so a renamed or removed option cannot
linger in the documentation. Nothing is run."""

import glob
import os
import re
import shlex

import pytest

import cifar_hybrid_classifier as chc
from conftest import ROOT

DOCUMENTS = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "RESULTS.md"),
             *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PROGRAM = "python cifar_hybrid_classifier.py"


def commands(text):
    """Each command of the program in a text: in code blocks (with `\\` continuations, `$ ` prompts,
    environment variables before it and `# comments` after it) and in `inline code`."""
    found = [" ".join(span.split()) for span in re.findall(r"`(python cifar_hybrid_classifier\.py[^`]*)`", text)]
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if PROGRAM in line and not line.lstrip().startswith("#"):
                line = line[line.index(PROGRAM):]
                found.append(" ".join(line.split(" #", 1)[0].split()))
    return found


def synopsis_to_argv(command):
    """A synopsis to a command line: `[--top 5]` gives `--top 5`, `a|b|c` its first choice."""
    command = re.sub(r"\[([^\]]*)\]", r"\1", command)
    return [word.split("|")[0] for word in shlex.split(command)][2:]  # less "python cifar_hybrid_classifier.py"


def check(argv):
    """Parse `argv` as `main` would, without running it; a usage error raises SystemExit."""
    commands = ("train", *chc.COMMANDS)
    if argv and not argv[0].startswith("-"):
        assert argv[0] in commands, f"unknown command {argv[0]!r}"
    command = argv.pop(0) if argv and argv[0] in commands else "train"
    if command == "train":
        chc.parse_config(argv)
    else:
        chc.build_command_parser(command).parse_args(argv)


ALL = [(os.path.relpath(path, ROOT), command) for path in DOCUMENTS for command in commands(open(path).read())]


def test_the_documents_show_commands():
    assert len(ALL) > 20 and "README.md" in {path for path, _ in ALL}


@pytest.mark.parametrize("document, command", ALL, ids=[f"{path}:{i}" for i, (path, _) in enumerate(ALL)])
def test_a_documented_command_parses(document, command, capsys):
    try:
        check(synopsis_to_argv(command))
    except SystemExit as exit_info:
        if exit_info.code == 0:  # --help or --version
            return
        pytest.fail(f"{document}: `{command}` does not parse: {capsys.readouterr().err.strip()}")


def test_the_check_fails_on_an_option_that_does_not_exist(capsys):
    text = "```bash\npython cifar_hybrid_classifier.py --data x.tar.gz \\\n  --no-such-option 3   # comment\n```"
    [command] = commands(text)
    assert command == "python cifar_hybrid_classifier.py --data x.tar.gz --no-such-option 3"
    with pytest.raises(SystemExit):
        check(synopsis_to_argv(command))
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
