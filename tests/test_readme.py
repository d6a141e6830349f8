"""Every ```python block of README.md runs, under the backend of this process.

Each block is executed in a fresh namespace, in a temporary working
directory, so every snippet must be self-contained (its own imports, tiny
arrays made inline, no network). The test id is the block's first comment
line, else the heading above it. A block that cannot run here (it needs the
original Keras 2 code, say) is fenced ```python no-run; those are listed in
`NO_RUN` below, so adding one is a deliberate, reviewed edit. A snippet that
defines test functions (the `assert_backends_agree` example) is executed
too, which checks its imports; the functions themselves are not called here
(the cross-backend tests in tests/consistency run `assert_backends_agree`).

Shell blocks are not run.
"""

import re
from pathlib import Path

import keras
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# The blocks fenced ```python no-run, by id, and why each cannot run.
NO_RUN = {
    "In the Keras 2 / tf_keras environment, with the trained model (old_model).": (
        "needs the user's trained Keras 2 model under tf_keras"
    ),
    "Scaling out on JAX: keras.distribution, heads sharded across devices": (
        "own process: run by tests/layers/test_distribution.py (jax lane)"
    ),
    "Scaling out on TensorFlow: tf.distribute.MirroredStrategy": (
        "own process: run by tests/layers/test_distribution.py (tensorflow lane)"
    ),
    "Scaling out on PyTorch: DistributedDataParallel (run as a script)": (
        "own process: run by tests/layers/test_distribution.py (torch lane)"
    ),
}

_FENCE = re.compile(r"^```(\S*)(.*)$")


def _blocks(text):
    """(info, first line number, code, heading) of each fenced block."""
    blocks, heading, current = [], "README", None
    for number, line in enumerate(text.splitlines(), start=1):
        if current is None:
            match = _FENCE.match(line)
            if match:
                info = (match.group(1) + match.group(2)).split()
                current = (info, number + 1, [], heading)
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            info, start, code, under = current
            blocks.append((info, start, "\n".join(code) + "\n", under))
            current = None
        else:
            current[2].append(line)
    assert current is None, (
        f"README.md: the block opened at line {current[1] - 1} is not closed"
    )
    return blocks


def _block_id(code, heading):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    return first[1:].strip() if first.startswith("#") else heading


def _python_blocks():
    """(id, line, code, no_run) of every python block, ids made unique."""
    out, seen = [], {}
    for info, line, code, heading in _blocks(README.read_text(encoding="utf-8")):
        if not info or info[0] != "python":
            continue
        block_id = _block_id(code, heading)
        seen[block_id] = seen.get(block_id, 0) + 1
        if seen[block_id] > 1:
            block_id = f"{block_id} ({seen[block_id]})"
        out.append((block_id, line, code, "no-run" in info[1:]))
    return out


BLOCKS = _python_blocks()
RUNNABLE = [b for b in BLOCKS if not b[3]]


@pytest.fixture
def fresh_keras_state(tmp_path, monkeypatch):
    """A temporary working directory, and Keras's global settings restored."""
    monkeypatch.chdir(tmp_path)
    data_format = keras.config.image_data_format()
    yield
    keras.config.set_image_data_format(data_format)
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "line, code",
    [
        pytest.param(
            line,
            code,
            id=block_id,
            marks=[
                pytest.mark.skip(
                    reason=(
                        "README ```python no-run: "
                        f"{NO_RUN.get(block_id, 'not in NO_RUN')}"
                    )
                )
            ]
            if no_run
            else [],
        )
        for block_id, line, code, no_run in BLOCKS
    ],
)
def test_readme_snippet_runs(line, code, fresh_keras_state):
    # Padding with newlines makes tracebacks point at README.md's own lines.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    exec(compiled, {"__name__": "__readme__"})


def test_no_run_blocks_are_the_listed_ones():
    found = {block_id for block_id, _, _, no_run in BLOCKS if no_run}
    assert found == set(NO_RUN), (
        "The README's ```python no-run blocks changed: make the new block runnable, "
        f"or list it in NO_RUN with the reason. Found: {sorted(found)}"
    )


def test_readme_has_runnable_snippets():
    # Guards the parser: a fence it stopped recognizing would silently test nothing.
    assert len(RUNNABLE) >= 10, [b[0] for b in BLOCKS]


def test_quick_start_is_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    shell = [code for info, _, code, _ in _blocks(section) if info and info[0] == "sh"]
    assert len(shell) == 1, shell
    commands = [line.split("#", 1)[0].strip() for line in shell[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_demo_table_has_its_marker():
    # The lead regenerates the block below this marker from a fresh-clone `make demo`.
    text = README.read_text(encoding="utf-8")
    assert "<!-- demo table: make demo -->\n```\nmhsa-core matrix" in text


def test_doc_links_exist():
    text = README.read_text(encoding="utf-8")
    links = set(re.findall(r"\]\(((?:docs|backends)/[^)#\s]+)", text))
    assert links, "the README links no docs"
    missing = sorted(p for p in links if not (README.parent / p).exists())
    assert not missing, missing


@pytest.mark.parametrize(
    "phrase", ["the seed", "seed block", "seed's", "seed defaults"]
)
def test_legacy_block_is_not_called_the_seed(phrase):
    # "seed" is only an RNG seed; the legacy block is the Keras 2 YOLOv4-MHSA block.
    text = README.read_text(encoding="utf-8").lower()
    assert phrase not in text
