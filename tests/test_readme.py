"""The README's commands run as written.

Every line of a ```` ```bash ```` block of README.md is a command a reader will paste, and every
```` ```python ```` block a snippet they will run. Each command is run here, in a workspace laid
out as the README assumes (the repository's ``docs/``, ``scripts/``, ``benchmarks/``, and small
generated photos under the names the README uses: ``photo.jpg``, ``a.jpg``, ``b.png``,
``photos/``, ``labels.csv``), offline (``QUALICLIP_OFFLINE=1``, an empty weight cache), unless
its comment carries a tag saying what it needs beyond that (:data:`TAGS`); those are skipped
with the tag's reason, so ``pytest -ra`` lists them. A command passes when it exits 0 and leaves
something to read: its output on stdout, or the files its output options name.

Commands that are a plain ``qualiclip ...`` (no pipes, globs or redirections) run in this
process through :func:`qualiclip.cli.main`, as the ``qualiclip`` entry point runs them, which
spares a fresh interpreter importing torch for each; the others run in bash with ``qualiclip``
and ``python`` on the ``PATH``. ``qualiclip serve`` starts the service (on a free port, which
replaces ``8000`` in the lines that follow it) and the ``curl`` lines ask it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port, running_server

pytestmark = pytest.mark.slow  # among the heaviest: `scripts/test.sh --fast` leaves it out

README = REPO_ROOT / "README.md"

#: What a tag in a command's comment means: the command needs this, so it is not run here.
TAGS = {
    "network": "downloads weights or photos (the test runs offline)",
    "dataset": "needs a rated dataset downloaded by hand",
    "GPU": "needs a CUDA GPU",
    "cluster": "needs a Ray cluster",
    "hours": "a long run",
    "installs": "sets up the environment (a virtual environment, packages)",
    "suite": "runs the whole test suite, this test included",
}

#: Commands run, but slower than a few seconds: with ``-m "not slow"`` they are left out, and
#: so is every command that reads what they write (``runs/``, an ``.onnx`` file).
SLOW = ("qualiclip train", "runs/", "--engine ray", "qualiclip export", ".onnx",
        "qualiclip degrade", "--dataset synthetic", "--precision auto")

#: Commands run in a fresh process even when they could run in this one: Ray's local cluster
#: is started and left to that process.
OWN_PROCESS = ("--engine ray",)

#: Options whose value is a file or folder the command writes.
OUTPUT_OPTIONS = ("-o", "--output", "--report", "--map", "--sheet", "--onnx", "--out")

#: Characters that make a line need a shell (pipes, globs, redirections, variables, ...).
SHELL_CHARS = set("|&;<>()$`*?[]~{}'\"\\")

SERVE_PORT = "8000"  # the README's port; the test's server listens on a free one


@dataclass(frozen=True)
class Command:
    """One line of a bash block, or one python block."""

    lang: str  # "bash" or "python"
    line: int  # 1-based line number in README.md
    code: str  # the command without its comment, or the whole python block
    tags: tuple[str, ...]

    @property
    def id(self) -> str:
        words = self.code.split() or [""]
        name = "-".join(words[:2]) if words[0] == "qualiclip" else words[0]
        return f"L{self.line}-{name}"


def tags_of(comment: str) -> tuple[str, ...]:
    """The tags ending a comment: ``# a first run [network] [GPU]`` -> ``("network", "GPU")``.
    Brackets elsewhere in a comment (``[B, 3, H, W]``) are prose, not tags."""
    ending = re.search(r"(?:\s*\[\w+\])+\s*$", comment)
    return tuple(re.findall(r"\[(\w+)\]", ending.group(0))) if ending else ()


def _split_comment(line: str) -> tuple[str, str]:
    """``(command, comment)``: the comment starts at the first ``#`` outside quotes that
    follows a blank (a ``#`` inside a word, such as a URL's, is not one)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def readme_commands(text: str) -> list[Command]:
    """The commands of every bash and python block of a Markdown text, in order."""
    commands: list[Command] = []
    lang, block_start, block = "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and not lang:
            lang, block_start, block = fence.group(1) or "text", number, []
            continue
        if fence and line.strip() == "```":
            if lang == "python" and block:  # tags on the block's first line
                tags = tags_of(_split_comment(block[0])[1])
                commands.append(Command("python", block_start + 1, "\n".join(block), tags))
            lang = ""
            continue
        if lang == "python":
            block.append(line)
        elif lang == "bash" and line.strip() and not line.lstrip().startswith("#"):
            code, comment = _split_comment(line)
            commands.append(Command("bash", number, code, tags_of(comment)))
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def _param(cmd: Command) -> object:
    unknown = [t for t in cmd.tags if t not in TAGS]
    marks: list[pytest.MarkDecorator] = []
    if cmd.tags and not unknown:
        reasons = "; ".join(f"[{t}] {TAGS[t]}" for t in cmd.tags)
        marks.append(pytest.mark.skip(reason=f"README line {cmd.line}: {reasons}"))
    elif any(s in cmd.code for s in SLOW):
        marks.append(pytest.mark.slow)
    return pytest.param(cmd, id=cmd.id, marks=marks)


# --- the workspace -------------------------------------------------------------------------------


def _write_inputs(root: Path) -> None:
    """The files the README's commands name, as small photos (from benchmarks/builtin_photos)."""
    from PIL import Image

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from builtin_photos import write_builtin_photos
    finally:
        sys.path.remove(str(REPO_ROOT / "benchmarks"))
    photos = write_builtin_photos(root / "photos", count=6, side=192)
    first = Image.open(photos[0]).convert("RGB")
    first.save(root / "photo.jpg", quality=90)
    first.save(root / "a.jpg", quality=90)
    Image.open(photos[1]).save(root / "b.png")
    rows = "".join(f"photos/{p.name},{10 * (i + 1)}\n" for i, p in enumerate(photos))
    (root / "labels.csv").write_text("path,score\n" + rows, encoding="utf-8")


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    servers: dict[str, str]  # a serve line's arguments -> the URL of its running server
    stack: contextlib.ExitStack


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("readme")
    for name in ("docs", "scripts", "benchmarks"):
        (root / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
    _write_inputs(root)
    bin_dir = root.parent / f"{root.name}-bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    shim = bin_dir / "qualiclip"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qualiclip.cli "$@"\n')
    shim.chmod(0o755)
    env = {
        "QUALICLIP_OFFLINE": "1",
        "QUALICLIP_HOME": str(root.parent / f"{root.name}-cache"),  # empty: nothing cached
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
    }
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield Workspace(root, {**os.environ}, {}, stack)


# --- running one command -------------------------------------------------------------------------


def _in_process(argv: list[str], ws: Workspace, capfd: pytest.CaptureFixture[str]) -> tuple[
        int, str, str]:
    from qualiclip import cli

    cwd = os.getcwd()
    os.chdir(ws.root)
    try:
        code = cli.main(argv)
    finally:
        os.chdir(cwd)
    out, err = capfd.readouterr()
    return code, out, err


def _in_bash(code: str, ws: Workspace) -> tuple[int, str, str]:
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {code}"], cwd=ws.root, env=ws.env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _serve(argv: list[str], ws: Workspace) -> str:
    """Start ``qualiclip serve ARGS`` once per argument list; its URL."""
    args = []
    it = iter(argv[2:])
    for arg in it:
        if arg in ("--host", "--port"):
            next(it, None)  # the test's own host and port
        elif not arg.startswith(("--host=", "--port=")):
            args.append(arg)
    key = " ".join(args)
    if key not in ws.servers:
        port = free_port()
        log = ws.root.parent / f"{ws.root.name}-serve-{port}.log"
        ws.servers[key] = ws.stack.enter_context(running_server(args, port, log, timeout=300))
    return ws.servers[key]


def _outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_OPTIONS]


def _check_output(cmd: Command, argv: list[str], out: str, ws: Workspace) -> None:
    """Something to read: the files the output options name, else stdout."""
    written = _outputs(argv)
    for name in written:
        path = ws.root / name
        assert path.exists(), f"README line {cmd.line}: {name} was not written"
        assert path.stat().st_size > 0 if path.is_file() else any(path.iterdir()), (
            f"README line {cmd.line}: {name} is empty")
    if not written:
        assert out.strip(), f"README line {cmd.line}: nothing on stdout"
    if argv[:2] == ["qualiclip", "score"] and not written:
        assert re.search(r"\b[01]\.\d{4}\b", out), f"README line {cmd.line}: no score in {out!r}"
    if argv[:1] == ["curl"]:
        answer = json.loads(out)
        assert answer["results"] and all(r["score"] is not None for r in answer["results"]), out


@pytest.mark.parametrize("cmd", [_param(c) for c in COMMANDS])
def test_readme_command(cmd: Command, workspace: Workspace,
                        capfd: pytest.CaptureFixture[str]) -> None:
    unknown = [t for t in cmd.tags if t not in TAGS]
    assert not unknown, f"README line {cmd.line}: unknown tag(s) {unknown}; known: {list(TAGS)}"
    if cmd.lang == "python":
        cwd = os.getcwd()
        os.chdir(workspace.root)
        try:
            exec(compile(cmd.code, f"README.md:{cmd.line}", "exec"), {"__name__": "__readme__"})
        finally:
            os.chdir(cwd)
        assert capfd.readouterr().out.strip(), f"README line {cmd.line}: printed nothing"
        return
    code = cmd.code
    for url in workspace.servers.values():
        code = code.replace(f"127.0.0.1:{SERVE_PORT}", url.removeprefix("http://"))
    argv = shlex.split(code)
    if argv[:2] == ["qualiclip", "serve"]:
        url = _serve(argv, workspace)
        import httpx

        page = httpx.get(f"{url}/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower(), page.text[:200]
        return
    if (argv[0] == "qualiclip" and not SHELL_CHARS & set(code)
            and not any(s in code for s in OWN_PROCESS)):
        status, out, err = _in_process(argv[1:], workspace, capfd)
    else:
        status, out, err = _in_bash(code, workspace)
    assert status == 0, f"README line {cmd.line} exited {status}: {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    _check_output(cmd, argv, out, workspace)


def test_the_readme_has_commands_of_each_kind() -> None:
    """The parser finds the README's commands: if it found none, every test above would pass."""
    run = [c for c in COMMANDS if not c.tags]
    assert len(run) >= 15, [c.code for c in run]
    assert any(c.code.startswith("qualiclip score") and "qualiclip-open" in c.code for c in run)
    assert any(c.lang == "python" for c in run)
    skipped = [c for c in COMMANDS if c.tags]
    assert all(set(c.tags) <= set(TAGS) for c in skipped)


def test_comments_and_tags_are_parsed() -> None:
    text = "\n".join([
        "```bash",
        "qualiclip score a.jpg   # a comment [network] [GPU]",
        "qualiclip score b.jpg   # scores [B, 3] of [network] images",
        "# a comment line",
        "curl http://h/#frag -F 'x=#1'",
        "```",
        "```python",
        "print(1)  # [hours]",
        "```",
        "```text",
        "not a command",
        "```",
    ])
    cmds = readme_commands(text)
    assert [(c.lang, c.line, c.code, c.tags) for c in cmds] == [
        ("bash", 2, "qualiclip score a.jpg", ("network", "GPU")),
        ("bash", 3, "qualiclip score b.jpg", ()),
        ("bash", 5, "curl http://h/#frag -F 'x=#1'", ()),
        ("python", 8, "print(1)  # [hours]", ("hours",)),
    ]
