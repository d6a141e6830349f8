"""The docs are tested: README.md and every page of docs/ (the site's pages).

- Every ```python block runs, under the backend of this process. Each block
  is executed in a fresh namespace, in a temporary working directory, so
  every snippet must be self-contained (its own imports, tiny arrays made
  inline, no network). The test id is the page and the block's first comment
  line, else the heading above it. A block that cannot run here (it needs the
  original Keras 2 code, or a process of its own) is fenced ```python no-run;
  those are listed in `NO_RUN` below with the reason, so adding one is a
  deliberate, reviewed edit, and they must still compile. A snippet that
  defines test functions (the `assert_backends_agree` example) is executed
  too, which checks its imports; the functions themselves are not called
  here (the cross-backend tests in tests/consistency run
  `assert_backends_agree`). Shell and text blocks are not run; yaml blocks
  must parse.
- The README's quick start is exactly `make demo` and `make test`, and the
  demo table (docs/demo.md) keeps the marker the lead regenerates it under.
- Every relative link resolves, with its #anchor: from the README to any file
  of the repository, from a docs page to a file inside docs/ (the site has
  nothing outside it). Anchors are GitHub's, which mkdocs.yml configures the
  site to use too, so one link works in both.
- The site builds with `mkdocs build --strict` (backend-independent: in the
  TensorFlow lane only), which also fails on a page missing from the nav, a
  broken link between pages, or an API page whose object is gone.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

# The blocks fenced ```python no-run, by "page: id", and why each cannot run.
NO_RUN = {
    "docs/presets.md: In the Keras 2 / tf_keras environment, "
    "with the trained model (old_model).": (
        "needs the user's trained Keras 2 model under tf_keras"
    ),
    "docs/scaling.md: Scaling out on JAX: keras.distribution, "
    "heads sharded across devices": (
        "own process: run by tests/layers/test_distribution.py (jax lane)"
    ),
    "docs/scaling.md: Scaling out on TensorFlow: tf.distribute.MirroredStrategy": (
        "own process: run by tests/layers/test_distribution.py (tensorflow lane)"
    ),
    "docs/scaling.md: Scaling out on PyTorch: DistributedDataParallel "
    "(run as a script)": (
        "own process: run by tests/layers/test_distribution.py (torch lane)"
    ),
    "docs/consistency.md: Every export cell of the issue-19 cases": (
        "minutes of exports in three workers; tests/consistency/"
        "test_export_cases.py runs most of these cells"
    ),
    "docs/consistency.md: Attention paths in exports": (
        "a fragment of an export: `model` is the user's, and the LiteRT runtime "
        "(tests/consistency/test_export.py exports with choice.fallback)"
    ),
}

_FENCE = re.compile(r"^```(\S*)(.*)$")


def _name(page):
    return page.relative_to(ROOT).as_posix()


def _blocks(text, page="README.md"):
    """(info, first line number, code, heading) of each fenced block."""
    blocks, heading, current = [], page, None
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
        f"{page}: the block opened at line {current[1] - 1} is not closed"
    )
    return blocks


def _block_id(code, heading):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    return first[1:].strip() if first.startswith("#") else heading


def _python_blocks():
    """(page, id, line, code, no_run) of every python block, ids made unique."""
    out, seen = [], {}
    for page in PAGES:
        name = _name(page)
        for info, line, code, heading in _blocks(page.read_text("utf-8"), name):
            if not info or info[0] != "python":
                continue
            block_id = f"{name}: {_block_id(code, heading)}"
            seen[block_id] = seen.get(block_id, 0) + 1
            if seen[block_id] > 1:
                block_id = f"{block_id} ({seen[block_id]})"
            out.append((page, block_id, line, code, "no-run" in info[1:]))
    return out


BLOCKS = _python_blocks()
RUNNABLE = [b for b in BLOCKS if not b[4]]


@pytest.fixture
def fresh_keras_state(tmp_path, monkeypatch):
    """A temporary working directory, and Keras's global settings restored."""
    monkeypatch.chdir(tmp_path)
    data_format = keras.config.image_data_format()
    yield
    keras.config.set_image_data_format(data_format)
    keras.config.set_dtype_policy("float32")


def _compiled(page, line, code):
    # Padding with newlines makes tracebacks point at the page's own lines.
    return compile("\n" * (line - 1) + code, str(page), "exec")


@pytest.mark.parametrize(
    "page, line, code",
    [
        pytest.param(
            page,
            line,
            code,
            id=block_id,
            marks=[
                pytest.mark.skip(
                    reason=(
                        f"```python no-run: {NO_RUN.get(block_id, 'not in NO_RUN')}"
                    )
                )
            ]
            if no_run
            else [],
        )
        for page, block_id, line, code, no_run in BLOCKS
    ],
)
def test_snippet_runs(page, line, code, fresh_keras_state):
    exec(_compiled(page, line, code), {"__name__": "__docs__"})


def test_no_run_blocks_are_the_listed_ones():
    found = {block_id for _, block_id, _, _, no_run in BLOCKS if no_run}
    assert found == set(NO_RUN), (
        "The ```python no-run blocks changed: make the new block runnable, "
        f"or list it in NO_RUN with the reason. Found: {sorted(found)}"
    )


@pytest.mark.parametrize(
    "page, line, code",
    [pytest.param(p, ln, c, id=i) for p, i, ln, c, no_run in BLOCKS if no_run],
)
def test_no_run_snippet_compiles(page, line, code):
    _compiled(page, line, code)  # a SyntaxError names the page and line


def test_docs_have_runnable_snippets():
    # Guards the parser: a fence it stopped recognizing would silently test nothing.
    assert len(RUNNABLE) >= 15, [b[1] for b in BLOCKS]
    assert any(b[0] == README for b in RUNNABLE), "no runnable README snippet"


def test_yaml_blocks_parse():
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the docs tools")
    found, errors = 0, []
    for page in PAGES:
        for info, line, code, _ in _blocks(page.read_text("utf-8"), _name(page)):
            if info and info[0] in ("yaml", "yml"):
                found += 1
                try:
                    yaml.safe_load(code)
                except yaml.YAMLError as e:
                    errors.append(f"{_name(page)}, block at line {line}: {e}")
    assert found, "no yaml block found (docs/ci.md has the users' workflow)"
    assert not errors, "\n".join(errors)


def test_quick_start_is_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    shell = [code for info, _, code, _ in _blocks(section) if info and info[0] == "sh"]
    assert len(shell) == 1, shell
    commands = [line.split("#", 1)[0].strip() for line in shell[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_demo_table_has_its_marker():
    # The lead regenerates the block below this marker from a fresh-clone `make demo`.
    text = (DOCS / "demo.md").read_text(encoding="utf-8")
    assert "<!-- demo table: make demo -->\n```\nmhsa-core matrix" in text


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines: move text to docs/"


# ------------------------------------------------------------------ links
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _prose(text):
    """The page without its fenced blocks (a link in code is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _slug(heading):
    """GitHub's anchor of a heading (and the site's: mkdocs.yml's toc slugify)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]*>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page):
    return {
        _slug(m.group(1))
        for line in _prose(page.read_text("utf-8")).splitlines()
        if (m := _HEADING.match(line))
    }


def _links(page):
    for target in _LINK.findall(_prose(page.read_text("utf-8"))):
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            yield target


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_links_resolve(page):
    broken = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif page != README and not file.is_relative_to(DOCS):
            broken.append(f"{target}: outside docs/, where the site has no page")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


# Pages that exist for the site only: its home page (the README is the
# repository's), and the changelog's include of CHANGELOG.md.
SITE_ONLY = ("index", "changelog")


def test_readme_links_every_docs_page():
    linked = {t.partition("#")[0] for t in _links(README)}
    pages = [p for p in sorted(DOCS.glob("*.md")) if p.stem not in SITE_ONLY]
    missing = [_name(p) for p in pages if _name(p) not in linked]
    assert not missing, f"README's Documentation list lacks {missing}"


@pytest.mark.parametrize(
    "phrase", ["the seed", "seed block", "seed's", "seed defaults"]
)
def test_legacy_block_is_not_called_the_seed(phrase):
    # "seed" is only an RNG seed; the legacy block is the Keras 2 YOLOv4-MHSA block.
    found = [_name(p) for p in PAGES if phrase in p.read_text("utf-8").lower()]
    assert not found, found


# -------------------------------------------------------------- the site
@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent; runs in the tensorflow pass",
)
def test_site_builds_strict(tmp_path):
    pytest.importorskip(
        "mkdocs", reason="the docs tools (backends/requirements-docs.txt) are absent"
    )
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        # Material's banner about its successor, printed at every build.
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The API pages are rendered from the docstrings, not left as directives.
    layer = (site / "api" / "layer" / "index.html").read_text("utf-8")
    assert 'id="mhsa_core.MultiHeadSelfAttention2D"' in layer
    assert "::: mhsa_core" not in layer
    changelog = (site / "changelog" / "index.html").read_text("utf-8")
    assert "0.2.0" in changelog  # CHANGELOG.md included, not its include line
