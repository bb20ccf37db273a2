"""README.md's commands, as a new user copies them: every shell line of a ```bash block and
every inline `.venv/bin/...` / `python -m ...` command names an entry point, file, make
target or venv program that exists, and uses only flags that entry point defines (read from
its own `--helpfull` / `--help`, nothing executed). Code blocks use the venv's Python.
The README's tensorboard command starts."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
# Flag definitions in absl's --helpfull ("  --[no]chat: ...") and argparse's --help
# ("  --num_workers NUM_WORKERS", "  --assign_gpus, --no-assign_gpus").
DEFINED = re.compile(r"^\s+--(?:\[no\])?([\w.\-]+):|^\s+--([\w.\-]+)|, --([\w.\-]+)", re.M)


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _split(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def block_commands(text: str) -> list[list[str]]:
    """The commands of every ```bash block: continuations joined, comments dropped."""
    out = []
    for lang, body in BLOCK.findall(text):
        if lang != "bash":
            continue
        pending = ""
        for line in body.splitlines():
            pending += line.rstrip("\\") + " " if line.endswith("\\") else line
            if line.endswith("\\"):
                continue
            try:
                words = _split(pending)
            except ValueError:  # a quote that closes on a later line
                pending += "\n"
                continue
            pending = ""
            if words:
                out.append(words)
    return out


def inline_commands(text: str) -> list[list[str]]:
    """Inline code spans outside blocks that run a Python entry point or a venv program."""
    prose = BLOCK.sub("", text)
    spans = (" ".join(m.split()) for m in INLINE.findall(prose))
    return [_split(s.replace("[", " ").replace("]", " ")) for s in spans
            if re.match(r"(\.venv/bin/|python3? (-m |\S+\.py))", s)]


def _without_env(words: list[str]) -> list[str]:
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value python ...
        words = words[1:]
    return words


def entry_of(words: list[str]) -> tuple[tuple[str, str], list[str]]:
    """(("module" | "script" | "program" | "make" | "other", name), the words after it)."""
    words = _without_env(words)
    head, rest = words[0], words[1:]
    if head in (".venv/bin/python", "python", "python3") and rest:
        if rest[0] == "-m":
            return ("module", rest[1]), rest[2:]
        return ("script", rest[0]), rest[1:]
    if head.startswith(".venv/bin/"):
        return ("program", head[len(".venv/bin/"):]), rest
    if head == "make":
        return ("make", rest[0]), rest[1:]
    return ("other", head), rest


def used_flags(args: list[str]) -> list[str]:
    """Flag names in `args`, up to a bare `--` (the launcher passes the rest on)."""
    names = []
    for a in args:
        if a == "--":
            break
        m = re.match(r"^--([A-Za-z][\w.\-]*)", a)
        if m:
            names.append(m.group(1))
    return names


def defined_flags(entries) -> dict:
    """{(kind, name): the flags it defines}, from `--helpfull` (absl) or `--help` (argparse),
    all entry points asked at once."""
    def start(kind, name, help_flag):
        cmd = [sys.executable, "-m", name] if kind == "module" else [sys.executable, name]
        return subprocess.Popen(cmd + [help_flag], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = {e: start(*e, "--helpfull") for e in entries}
    out = {}
    for entry, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:  # argparse knows only --help
            retry = start(*entry, "--help")
            stdout, stderr = retry.communicate(timeout=300)
            assert retry.returncode == 0, f"{entry[1]} --help failed: {stderr[-500:]}"
        # (absl lists its own "-?,--[no]help" in a form of its own)
        out[entry] = {"help"} | {n for groups in DEFINED.findall(stdout) for n in groups if n}
    return out


def _python_commands():
    text = _readme()
    seen = {}
    for words in block_commands(text) + inline_commands(text):
        (kind, name), rest = entry_of(words)
        if kind in ("module", "script"):
            seen.setdefault((kind, name), set()).update(used_flags(rest))
            if "--" in rest and name == "deepseek_tf.launch":  # the workers' train flags
                after = rest[rest.index("--") + 1:]
                seen.setdefault(("module", "deepseek_tf.train"), set()).update(used_flags(after))
    return seen


def test_code_blocks_run_the_venvs_python():
    bare = [" ".join(w) for w in block_commands(_readme())
            if _without_env(w)[0] in ("python", "python3")]
    assert not bare, f"use .venv/bin/python in README code blocks: {bare}"


def test_files_programs_and_make_targets_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
    text = _readme()
    for words in block_commands(text) + inline_commands(text):
        (kind, name), rest = entry_of(words)
        if kind == "program":
            assert os.path.exists(os.path.join(VENV_BIN, name)), f".venv/bin/{name}"
        elif kind == "make":
            assert name in targets, f"make {name}"
        elif kind == "script" or (kind == "other" and name == "bash"):
            path = name if kind == "script" else rest[0]
            assert os.path.isfile(os.path.join(ROOT, path)), path
        for a in rest:
            if a.startswith("--flagfile="):
                assert os.path.isfile(os.path.join(ROOT, a.split("=", 1)[1])), a


def test_every_entry_point_exists_and_defines_the_flags_used():
    commands = _python_commands()
    assert ("module", "deepseek_tf.tools.merge_lora") in commands  # the Tools table is read
    assert ("module", "deepseek_tf.generate") in commands  # the Quickstart's Next line
    for kind, name in commands:
        if kind == "module":
            assert importlib.util.find_spec(name) is not None, f"python -m {name}: no such module"
    helps = defined_flags(sorted(commands))
    for (kind, name), flags in sorted(commands.items()):
        defined = helps[(kind, name)]
        unknown = sorted(f for f in flags if f not in defined and not (
            f.startswith("no") and f[2:] in defined))
        assert not unknown, f"{name}: README uses undefined flags {unknown}"


def test_console_scripts_point_at_entry_functions():
    with open(os.path.join(ROOT, "setup.py")) as f:
        scripts = re.findall(r'"(deepseek-tf-[\w-]+)=([\w.]+):(\w+)"', f.read())
    names = {s for s, _, _ in scripts}
    for needed in ("train", "prepare", "generate", "evaluate", "export", "merge-lora"):
        assert f"deepseek-tf-{needed}" in names
    for script, module, func in scripts:
        spec = importlib.util.find_spec(module)
        assert spec is not None, script
        with open(spec.origin, encoding="utf-8") as f:
            assert re.search(rf"^def {func}\(", f.read(), re.M), f"{script}: {module}:{func}"


def test_tensorboard_starts_from_the_venv():
    proc = subprocess.run([os.path.join(VENV_BIN, "tensorboard"), "--version"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert re.match(r"2\.20\.", proc.stdout.strip()), proc.stdout
    assert "pkg_resources" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("snippet,want", [
    ("```bash\n.venv/bin/python -m a.b --x=1 \\\n    --y=2  # c\nmake train\n```\n",
     [[".venv/bin/python", "-m", "a.b", "--x=1", "--y=2"], ["make", "train"]]),
    ("```bash\nexport T='{\"a\":\n  1}'\npython x.py --z\n```\n",
     [["export", 'T={"a":\n  1}'], ["python", "x.py", "--z"]]),
])
def test_block_commands_join_continuations_and_quotes(snippet, want):
    assert block_commands(snippet) == want
