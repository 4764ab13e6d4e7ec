"""Every benchmark reports through bench/_report.py (issue 20): it writes its tables and a
plot to `bench/out/NAME.md` + `NAME.png` with `save(...)`, so that a new benchmark cannot
skip it. The check reads the source (ast), it runs nothing: a script under `bench/` with an
`if __name__ == "__main__":` block is a benchmark, unless it is a helper (`_*.py`) or a
server / model that benchmarks start (listed in `NOT_BENCHMARKS`).

Also: `save` writes both files where `TETHER_BENCH_OUT` says, and `Transcript` keeps what
was printed while still printing it.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Started by benchmarks, not benchmarks themselves.
NOT_BENCHMARKS = {
    "naive_relay.py",
    "bare_relay.py",
    "bare_upstream_relay.py",
    "scripted_upstream.py",
    "capacity.py",
    # A profiler: it prints cProfile's listing, not a table of figures.
    "profile_relay.py",
}


def benchmarks() -> list[Path]:
    return [
        path
        for path in sorted(BENCH.glob("*.py"))
        if not path.name.startswith("_")
        and path.name not in NOT_BENCHMARKS
        and has_main(ast.parse(path.read_text(), str(path)))
    ]


def has_main(tree: ast.Module) -> bool:
    """A module-level `if __name__ == "__main__":`."""
    return any(
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
        for node in tree.body
    )


def imports_report(tree: ast.Module) -> bool:
    return any(
        (isinstance(node, ast.ImportFrom) and node.module == "_report")
        or (isinstance(node, ast.Import) and any(a.name == "_report" for a in node.names))
        for node in ast.walk(tree)
    )


def calls_save(tree: ast.Module) -> bool:
    """`save(...)` (imported from _report) or `_report.save(...)` somewhere."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "save":
            return True
        if (
            isinstance(func, ast.Attribute)
            and func.attr == "save"
            and isinstance(func.value, ast.Name)
            and func.value.id == "_report"
        ):
            return True
    return False


def test_benchmarks_are_found() -> None:
    names = {p.name for p in benchmarks()}
    assert {"cancel.py", "soak.py", "fuzz.py"} <= names
    assert not names & NOT_BENCHMARKS


@pytest.mark.parametrize("path", benchmarks(), ids=lambda p: p.name)
def test_benchmark_saves_its_report(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    assert imports_report(tree), f"bench/{path.name} does not import _report"
    assert calls_save(tree), f"bench/{path.name} never calls save(...)"


def load_report() -> ModuleType:
    """bench/_report.py, loaded from its file (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_report", BENCH / "_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_report"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_save_writes_the_table_and_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = load_report()
    out = tmp_path / "out"
    monkeypatch.setenv("TETHER_BENCH_OUT", str(out))
    md, png = report.save(
        "demo",
        "| measure | ms |\n| --- | --- |\n| reply | 3 |\n\n",
        report.Chart("latency", "ms", ["p50", "p99"], {"tether": [3.0, 9.0]}),
        report.Chart("lines", "MiB", [0, 1.5, 4], {"rss": [1, 2, 2]}, kind="line"),
        report.Chart("routes", "n", ["GET /a", "POST /b"], {"2xx": [5, 7]}, horizontal=True),
    )
    assert (md, png) == (out / "demo.md", out / "demo.png")
    assert md.read_text() == "| measure | ms |\n| --- | --- |\n| reply | 3 |\n"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_transcript_prints_and_keeps(capsys: pytest.CaptureFixture[str]) -> None:
    report = load_report()
    with report.Transcript() as printed:
        print("| a |")
        print("| 1 |")
    print("after")
    assert printed.text == "| a |\n| 1 |\n"
    assert capsys.readouterr().out == "| a |\n| 1 |\nafter\n"


def test_progress_counts() -> None:
    report = load_report()
    assert list(report.progress(range(3), desc="x")) == [0, 1, 2]
    with report.progress(total=4, desc="y") as bar:
        bar.update(4)
        assert bar.n == 4
