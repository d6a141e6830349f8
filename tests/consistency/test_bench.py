"""`mhsa-core bench`: its arguments, its FLOP count, its JSON, table and plot.

One bench run on the tiny_relative config (JAX, compiled, forward+backward,
one repeat: four worker processes, ~20 s on a quiet machine) serves every
test of the output, and checks the outputs of the layer's paths and of the
native, relative terms included, against the float64 reference; the rest
needs no worker or a worker killed at once. The "timm" rows (torch) are
checked the same way at small sizes of their configs: a worker each,
torch.compile, forward (~10 s each). No test asserts a speed.
"""

import dataclasses
import json
import subprocess
import sys

import pytest

from mhsa_core import cli
from mhsa_core._subprocess import unavailable_reason
from mhsa_core.bench import command, report, run, timm_peer, worker
from mhsa_core.bench.configs import CONFIGS, DEFAULT_CONFIGS, BenchConfig
from mhsa_core.bench.flops import flops, forward_flops
from mhsa_core.bench.plan import BENCH_BACKENDS, Measurement, plan
from mhsa_core.bench.subjects import Skipped, Unsupported

FRAMEWORKS = ("keras", "tensorflow", "torch", "jax")
RUN_PATHS = ("full", "chunked", "native", "keras_mha")
TINY_RELATIVE_FLOPS = 98304 + 262144 + 32768  # test_flops_by_hand


# ----------------------------------------------------------------- FLOPs
def test_flops_by_hand():
    # tiny: B=1, N=64, C=16, 2 heads of kd = dv = 8.
    # q, k, v: 2*1*64*16*(2*2*8 + 16) = 98304; q k^T and probs v:
    # 2*1*2*64^2*(8 + 8) = 262144
    tiny = CONFIGS["tiny"]
    assert forward_flops(tiny) == 98304 + 262144
    assert flops(tiny, "forward+backward") == 3 * (98304 + 262144)
    # relative, B=1, H=2, W=3 (N=6), C=4, 2 heads of 2: projections 2*6*4*(8 + 4) = 576,
    # attention 2*2*36*4 = 576, position 2*2*6*(2 + 3)*2 = 240
    rel = BenchConfig("r", 1, 2, 3, 4, 2, "relative")
    assert forward_flops(rel) == 576 + 576 + 240
    # tiny_relative: tiny + position 2*1*2*64*(8 + 8)*8 = 32768
    assert forward_flops(CONFIGS["tiny_relative"]) == 98304 + 262144 + 32768
    # kd = dv = C/h: the closed form 6BNC^2 + 4BN^2C
    n4096 = CONFIGS["n4096"]
    assert forward_flops(n4096) == 6 * 2 * 4096 * 256**2 + 4 * 2 * 4096**2 * 256
    # swin: each query attends to its 7x7 window's 49 keys, not N = 3136:
    # 6BNC^2 + 4BNKC (the per-head bias is a gather, not counted).
    swin = CONFIGS["swin"]
    assert swin.keys == 49
    assert forward_flops(swin) == 6 * 2 * 3136 * 96**2 + 4 * 2 * 3136 * 49 * 96
    # tiny_pvt: B=1, 8x8 (N=64), C=16, 2 heads of 8, keys reduced 2x2: K = 16.
    # q 2*64*16*16 = 32768; k, v of 16 tokens 2*16*16*(16 + 16) = 16384; the
    # conv 2*16*(2*2*16)*16 = 32768; q k^T and probs v 2*2*64*16*(8 + 8) = 65536
    tiny_pvt = CONFIGS["tiny_pvt"]
    assert tiny_pvt.keys == 16
    assert forward_flops(tiny_pvt) == 32768 + 16384 + 32768 + 65536


def test_pvt_v2_config_is_pvt_v2_b0_first_stage():
    """56x56x64, one head, keys and values reduced 8x8 with timm's LayerNorm
    epsilon: the layer's arguments, the reduction's weights; not a default
    config."""
    pvt = CONFIGS["pvt_v2"]
    assert pvt.layer_config == {
        "num_heads": 1,
        "position_encoding": "none",
        "kv_reduction": 8,
        "norm_epsilon": 1e-5,
    }
    assert pvt.keys == 49
    assert pvt.describe() == "2x56x56x64, 1 head, keys reduced 8x8"
    assert BenchConfig.from_json(pvt.to_json()) == pvt
    assert "pvt_v2" not in DEFAULT_CONFIGS
    _, _, weights = worker.inputs(pvt)
    assert weights["reduction_kernel"].shape == (8, 8, 64, 64)


def test_swin_config_is_swin_ts_first_stage():
    """56x56x96, 3 heads, 7x7 windows shifted by 3: the layer's arguments,
    its tables of the window, its description; not a default config."""
    swin = CONFIGS["swin"]
    assert swin.layer_config == {
        "num_heads": 3,
        "position_encoding": "relative_bias",
        "window_size": 7,
        "shift_size": 3,
        "scale_position_logits": False,
    }
    assert swin.position_size == (7, 7)
    assert swin.describe() == ("2x56x56x96, 3 heads, relative_bias, window 7 shifted 3")
    assert BenchConfig.from_json(swin.to_json()) == swin
    _, _, weights = worker.inputs(swin)
    assert weights["relative_bias_table"].shape == (13, 13, 3)


def test_plan_gives_each_backend_its_modes():
    rows = plan(["torch", "tensorflow"], ["tiny"], ["full"], ["graph"])
    assert [(m.backend, m.mode) for m in rows] == [("tensorflow", "graph")] * 2
    assert [m.direction for m in rows] == ["forward", "forward+backward"]


# ---------------------------------------------------------------- timm rows
# config -> timm's peer: every config with one; the others get no "timm" row.
TIMM_PEERS = {
    "n4096_relative": "bottleneck",
    "rope_n4096": "eva",
    "swin": "swin",
    "tiny_relative": "bottleneck",
    "pvt_v2": "pvt_v2",
    "tiny_pvt": "pvt_v2",
}
# Reduced keys: no native (the fused natives carry no reduction) and no
# keras_mha (another block) rows, by plan.
NO_NATIVE = {"pvt_v2", "tiny_pvt"}


def test_plan_gives_timm_rows_only_on_torch_for_configs_with_a_peer():
    rows = plan(BENCH_BACKENDS, list(CONFIGS), ["native", "timm"])
    timm = [m for m in rows if m.path == "timm"]
    assert {m.backend for m in timm} == {"torch"}
    assert {m.mode for m in timm} == {"compiled", "eager"}
    assert {m.config for m in timm} == set(TIMM_PEERS)
    assert len(timm) == len(TIMM_PEERS) * 2 * 2  # modes x directions
    # The native rows: every config but those with reduced keys.
    assert {m.config for m in rows if m.path == "native"} == set(CONFIGS) - NO_NATIVE
    keras_mha = plan(BENCH_BACKENDS, list(CONFIGS), ["keras_mha"])
    assert {m.config for m in keras_mha} == set(CONFIGS) - NO_NATIVE
    for name, config in CONFIGS.items():
        peer = timm_peer.peer_of(config)
        assert (peer and peer.name) == TIMM_PEERS.get(name), name


def test_timm_rows_skipped_without_timm(monkeypatch):
    """Without timm a "timm" row is "skipped" with the reason, and no worker
    starts (run_worker would fail the test)."""
    monkeypatch.setattr(timm_peer, "unavailable_reason", lambda: "no timm here")
    monkeypatch.setattr(run, "run_worker", lambda *a, **k: pytest.fail("a worker"))
    rows, skipped = run.run(
        plan(["torch"], ["swin"], ["timm"], ["eager"], ["forward"]),
        CONFIGS,
        repeats=1,
        timeout=1.0,
        max_memory_gb=1.0,
    )
    assert [(r["status"], r["reason"]) for r in rows] == [("skipped", "no timm here")]
    assert not skipped or "torch" in skipped


# The peers' configs at a size whose every output is checked (B * heads * N *
# K within worker.CHECK_MAX_LOGITS) and one eager worker each runs in
# seconds: Swin's windows (two 7x7 windows a side, shifted by 3), EVA's rope.
SMALL_TIMM_CONFIGS = {
    "swin": dataclasses.replace(
        CONFIGS["swin"], batch=1, height=14, width=14, channels=12
    ),
    "rope_n4096": dataclasses.replace(
        CONFIGS["rope_n4096"], batch=1, height=8, width=6, channels=32, num_heads=2
    ),
    "n4096_relative": CONFIGS["tiny_relative"],
    "pvt_v2": CONFIGS["tiny_pvt"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_TIMM_CONFIGS)
def test_timm_row_is_the_block_within_budget(name):
    """timm's module with the row's weights (a torch worker, compiled:
    dynamo reads timm's code, and once imported timm's package through the
    loaded class's globals; forward) equals the float64 reference within its
    budget rule, as the native rows are judged; the small config has the real
    one's peer."""
    reason = unavailable_reason("torch") or timm_peer.unavailable_reason()
    if reason:
        pytest.skip(reason)
    config = SMALL_TIMM_CONFIGS[name]
    assert timm_peer.peer_of(config) == timm_peer.peer_of(CONFIGS[name])
    m = Measurement("torch", name, "timm", "compiled", "forward")
    row = run.run_worker(m, config, 1, timeout=300.0, max_memory_gb=8.0)
    assert row["status"] == "ok", row.get("reason")
    check = row["check"]
    assert check is not None and check["passed"], check
    assert row["note"].startswith("timm's ")


# ------------------------------------------------------------ arguments
BAD_ARGUMENTS = [
    ("backends", ["--backends", "theano"], "'theano'"),
    ("configs", ["--configs", "tiny,huge"], "'tiny,huge'"),
    ("paths", ["--paths", "flash"], "'flash'"),
    ("modes", ["--modes", "jit"], "'jit'"),
    ("directions", ["--directions", "backward"], "'backward'"),
    ("repeats", ["--repeats", "0"], "'0'"),
    ("repeats", ["--repeats", "2.5"], "'2.5'"),
    ("timeout", ["--timeout", "-1"], "'-1'"),
    ("max-memory", ["--max-memory", "nan"], "'nan'"),
    ("json", ["--json", "/no/such/dir/bench.json"], "'/no/such/dir/bench.json'"),
    ("plot", ["--plot", "/no/such/dir/bench.png"], "'/no/such/dir/bench.png'"),
    ("from", ["--from", "/no/such/bench.json"], "'/no/such/bench.json'"),
]


@pytest.mark.parametrize(
    "argument,args,value", BAD_ARGUMENTS, ids=[f"{a}={v}" for a, _, v in BAD_ARGUMENTS]
)
def test_bad_argument_exits_2_with_one_line(argument, args, value, capsys):
    assert cli.main(["bench", "--configs", "tiny", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"mhsa-core: error: --{argument}: ")
    assert lines[0].endswith(f"received: {value}")
    assert captured.out == ""


def test_help_imports_no_framework():
    code = (
        "import sys\n"
        "from mhsa_core import cli\n"
        "from mhsa_core.bench import command, configs, flops, memory, plan, report, "
        "run\n"
        "status = cli.main(['bench', '--help'])\n"
        f"print(status, sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "n4096_relative" in proc.stdout  # the configs are listed
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout[-500:]


# --------------------------------------------------- one run on the tiny config
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if unavailable_reason("jax"):
        pytest.skip(f"jax: {unavailable_reason('jax')}")
    out = tmp_path_factory.mktemp("bench")
    plot = out / "bench.png" if _has_matplotlib() else None
    args = [
        "bench",
        "--backends",
        "jax",
        "--configs",
        "tiny_relative",
        "--modes",
        "compiled",
        "--directions",
        "forward+backward",
        "--paths",
        ",".join(RUN_PATHS),
        "--repeats",
        "1",
        "--json",
        str(out / "bench.json"),
    ]
    if plot is not None:
        args += ["--plot", str(plot)]
    proc = subprocess.run(
        [sys.executable, "-m", "mhsa_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads((out / "bench.json").read_text()), plot


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


ROW_KEYS = {
    "backend",
    "config",
    "path",
    "mode",
    "direction",
    "status",
    "reason",
    "ms",
    "times_ms",
    "first_ms",
    "gflops",
    "ceiling_gflops",
    "ceiling_op",
    "ceiling_pct",
    "native_ratio",
    "peak_gb",
    "memory_exact",
    "chosen_path",
    "chunk_size",
    "check",
    "note",
    "framework_version",
    "seconds",
}


def test_json_schema(tiny_run):
    _, doc, _ = tiny_run
    assert {
        "tool",
        "version",
        "seconds",
        "complete",
        "machine",
        "options",
        "flops",
        "modes",
        "natives",
        "backends",
        "configs",
        "rows",
    } <= set(doc)
    assert doc["complete"] is True  # rewritten after each row, complete at the end
    assert doc["options"]["repeats"] == 1
    assert doc["backends"] == {
        "jax": {"version": doc["rows"][0]["framework_version"], "skipped": None}
    }
    tiny = doc["configs"]["tiny_relative"]
    assert tiny["tokens"] == 64 and tiny["position_encoding"] == "relative"
    assert tiny["forward_backward_gflop"] == pytest.approx(
        3 * TINY_RELATIVE_FLOPS / 1e9
    )
    rows = doc["rows"]
    assert [r["path"] for r in rows] == list(RUN_PATHS)
    for row in rows:
        assert ROW_KEYS <= set(row), sorted(ROW_KEYS - set(row))
        assert (row["backend"], row["config"], row["mode"], row["direction"]) == (
            "jax",
            "tiny_relative",
            "compiled",
            "forward+backward",
        )
        assert row["status"] == "ok", row["reason"]
        assert len(row["times_ms"]) == 1 and row["ms"] == row["times_ms"][0]
        assert row["peak_gb"] >= 0 and row["ceiling_gflops"] > 0
        assert row["gflops"] == pytest.approx(
            3 * TINY_RELATIVE_FLOPS / (row["ms"] / 1e3) / 1e9
        )
        assert row["ceiling_pct"] == pytest.approx(
            100 * row["gflops"] / row["ceiling_gflops"]
        )
    by_path = {r["path"]: r for r in rows}
    assert by_path["native"]["native_ratio"] == 1.0
    assert by_path["full"]["native_ratio"] == pytest.approx(
        by_path["full"]["ms"] / by_path["native"]["ms"]
    )
    assert by_path["chunked"]["chosen_path"] == "chunked"
    assert by_path["chunked"]["chunk_size"] == 64  # the default tile, capped at N
    assert by_path["full"]["chosen_path"] == "full"


def test_outputs_checked_against_the_reference(tiny_run):
    # The layer's paths and the native compute the block, relative logits
    # included: each output is within the float64 reference's budget. Keras's
    # MHA is another block: unchecked.
    _, doc, _ = tiny_run
    for row in doc["rows"]:
        if row["path"] == "keras_mha":
            assert row["check"] is None
        else:
            assert row["check"]["passed"], row
            assert 0 <= row["check"]["error"] <= row["check"]["budget"]


def test_text_table(tiny_run):
    proc, doc, _ = tiny_run
    text = proc.stdout
    assert "tiny_relative: 1x8x8x16, 2 heads, relative (N=64;" in text
    header = next(line for line in text.splitlines() if line.startswith("path"))
    assert header.split() == ["path", "mode", "direction", "jax"]
    for row in doc["rows"]:
        line = next(
            line for line in text.splitlines() if line.startswith(row["path"] + " ")
        )
        assert line.split()[1:3] == ["compiled", "fwd+bwd"]
        assert (
            f"{row['native_ratio']:.2f}x" in line and f"{row['peak_gb']:.2f} GB" in line
        )
    assert "3 of 3 within budget" in text  # keras_mha is another block
    assert "[1/4] jax tiny_relative full compiled forward+backward: " in proc.stderr


def test_from_json_renders_without_running(tiny_run, tmp_path, capsys):
    _, doc, _ = tiny_run
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(doc))
    assert cli.main(["bench", "--from", str(saved), "--summary", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| config | path | direction | jax |" in text
    full = next(r for r in doc["rows"] if r["path"] == "full")
    assert f"| tiny_relative | full | fwd+bwd | {report.cell(full)} |" in text


def test_from_several_reports_merges_their_rows(tiny_run, tmp_path, capsys):
    # A run made in parts: the second part's rows join the first's, a row
    # measured again replaces the earlier one, the ratios are derived again.
    _, doc, _ = tiny_run
    first = {**doc, "rows": [r for r in doc["rows"] if r["path"] != "native"]}
    again = {**next(r for r in doc["rows"] if r["path"] == "full"), "ms": 1e6}
    second = {
        **doc,
        "rows": [r for r in doc["rows"] if r["path"] == "native"] + [again],
    }
    paths = []
    for i, part in enumerate((first, second)):
        paths += ["--from", str(tmp_path / f"part{i}.json")]
        (tmp_path / f"part{i}.json").write_text(json.dumps(part))
    merged_path = tmp_path / "merged.json"
    assert cli.main(["bench", *paths, "--json", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    by_path = {r["path"]: r for r in merged["rows"]}
    assert sorted(by_path) == sorted(RUN_PATHS) and len(merged["rows"]) == len(
        RUN_PATHS
    )
    assert by_path["full"]["ms"] == 1e6
    assert by_path["full"]["native_ratio"] == pytest.approx(
        1e6 / by_path["native"]["ms"]
    )
    assert len(merged["runs"]) == 2
    capsys.readouterr()


def test_plot_written(tiny_run):
    _, _, plot = tiny_run
    if plot is None:
        pytest.skip("matplotlib is not installed")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------ rows that did not run, no workers
def _row(path, status="ok", **fields):
    row = {
        "backend": "torch",
        "config": "tiny",
        "path": path,
        "mode": "eager",
        "direction": "forward",
        "status": status,
        "reason": None,
    }
    if status == "ok":
        row.update(ms=2.0, ceiling_gflops=1.0, peak_gb=0.5, check=None)
    return {**row, **fields}


def test_render_rows_that_did_not_run():
    rows = [
        _row("native"),
        _row("full", check={"error": 3.0, "budget": 1.0, "passed": False}),
        _row("chunked", "out of memory", reason="killed at 9.1 GB resident"),
        _row("fused", "unsupported", reason="fused cannot run this layer"),
        _row("auto", "failed", reason="RuntimeError: boom"),
    ]
    doc = report.build(
        run.derive(rows, CONFIGS),
        {"jax": "not installed: needs jax"},
        CONFIGS,
        backends=["torch", "jax"],
        options={},
        seconds=1.0,
    )
    text = report.render(doc)
    lines = text.splitlines()
    assert "jax: skipped (not installed: needs jax)" in lines
    cells = {
        line.split()[0]: line for line in lines if line.split()[:2][-1:] == ["eager"]
    }
    assert "2.00 ms, " in cells["native"] and "1.00x, 0.50 GB" in cells["native"]
    assert cells["full"].endswith("(OVER BUDGET)")
    assert cells["chunked"].endswith("out of memory")
    assert (
        "- out of memory (torch tiny chunked eager fwd): killed at 9.1 GB resident"
        in lines
    )
    assert "- unsupported (1 rows): fused cannot run this layer" in lines
    assert "- failed (torch tiny auto eager fwd): RuntimeError: boom" in lines
    assert any(
        line.startswith("- over budget (torch tiny full eager fwd)") for line in lines
    )
    markdown = report.config_table(doc, "tiny", markdown=True).splitlines()
    assert "| path | mode | direction | torch |" in markdown


@pytest.mark.parametrize(
    "error,status",
    [
        (Unsupported("no such path"), "unsupported"),
        (Skipped(timm_peer.NOT_INSTALLED), "skipped"),
        (MemoryError(), "out of memory"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
            "out of memory",
        ),
        (ValueError("bad\nsecond line"), "failed"),
    ],
    ids=["unsupported", "skipped", "MemoryError", "torch-allocator", "other"],
)
def test_worker_classifies_errors(error, status):
    got, reason = worker.classify(error)
    assert got == status and "\n" not in reason


@pytest.mark.parametrize(
    "limits,status,reason",
    [
        ({"timeout": 0.5, "max_memory_gb": 100.0}, "timeout", "over --timeout 0.5 s"),
        (
            {"timeout": 60.0, "max_memory_gb": 0.001},
            "out of memory",
            "over --max-memory 0.001 GB",
        ),
    ],
    ids=["timeout", "memory"],
)
def test_watchdog_kills_a_worker_into_a_row(limits, status, reason):
    m = Measurement("jax", "tiny", "full", "compiled", "forward")
    result = run.run_worker(m, CONFIGS["tiny"], 1, **limits)
    assert result["status"] == status and f"({reason})" in result["reason"]


def test_options_defaults():
    args = cli.build_parser().parse_args(["bench"])
    opts = command.options(args)
    assert opts["configs"] == ["legacy", "n4096", "n16384", "n4096_relative"]
    assert opts["backends"] == ["tensorflow", "torch", "jax"]
    assert opts["repeats"] == command.DEFAULT_REPEATS and opts["max_memory_gb"] > 0
