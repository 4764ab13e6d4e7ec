"""tether's concurrency discipline, checked on the source (issue 15; AnyIO's rules).

- A cancellation is never swallowed: no `contextlib.suppress` of `BaseException` or
  `CancelledError`, and no `except` catching either (or a bare `except:`) whose body does
  not re-raise (`raise`, or `raise` of the name it bound).
- No task is left unowned: no `asyncio.create_task` / `asyncio.ensure_future` /
  `loop.create_task`; tasks live in a task group. The allow-list below names the few
  functions that must own a task outside one, each with its reason.

The checks read the syntax tree, so a comment or a string never counts, and each offence is
printed as file:line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "tether"

# (file under src/tether, enclosing function) -> why it may create a task itself.
TASK_ALLOWED: dict[tuple[str, str], str] = {
    # The cancel-signal listener lives from open() to close(), which the Dispatch protocol
    # lets different tasks call, and a task group must be left by the task that entered
    # it. So RedisDispatch owns the task: close() cancels it and awaits it with
    # asyncio.wait (no cancellation but its own is caught), and the listener logs its own
    # failure when it happens.
    (
        "dispatch.py",
        "RedisDispatch.open",
    ): "owned task spanning open()..close(), which may run in different tasks",
    # The host of the Runner's task group (every run and daemon lives in that group): the
    # one task outside it, for the same reason (Lifecycle.start and .stop may be called
    # from different tasks); Runner.close() awaits it.
    ("runner.py", "Runner.open"): "the task group's host, awaited by Runner.close()",
    # The stores' background tasks (PostgreSQL's flusher, the Redis live log's listener and
    # publisher) span Store.open()..close(), again possibly different tasks: each is kept
    # by its store, its failure logged when it happens, and awaited by `common.stop`.
    ("store/common.py", "start"): "store tasks spanning open()..close(), awaited by stop()",
}

CANCELLATIONS = {"BaseException", "CancelledError", "get_cancelled_exc_class"}
SPAWNERS = {"create_task", "ensure_future"}


def _names(node: ast.expr | None) -> set[str]:
    """The exception classes an `except` or a `suppress(...)` argument names (the last
    component of each: `asyncio.CancelledError` is `CancelledError`, a call such as
    `anyio.get_cancelled_exc_class()` is its function's name)."""
    if node is None:
        return set()
    if isinstance(node, ast.Tuple | ast.List):
        return set().union(*(_names(e) for e in node.elts))
    if isinstance(node, ast.Starred):
        return _names(node.value)
    if isinstance(node, ast.Call):
        return _names(node.func)
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Name):
        return {node.id}
    return set()


def _reraises(handler: ast.ExceptHandler) -> bool:
    """The handler's body holds a `raise` of what it caught (not looking into functions
    defined there, which do not run as part of it)."""
    stack: list[ast.AST] = list(handler.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.Raise) and (
            node.exc is None or (isinstance(node.exc, ast.Name) and node.exc.id == handler.name)
        ):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _is_suppress(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr == "suppress") or (
        isinstance(func, ast.Name) and func.id == "suppress"
    )


def _spawns(call: ast.Call) -> bool:
    """`asyncio.create_task(...)`, `asyncio.ensure_future(...)`, the same imported bare,
    or `create_task` on an event loop (`loop.create_task`, `get_running_loop().create_task`).
    A task group's own `create_task` (asyncio.TaskGroup) is not one of them."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in SPAWNERS
    if not isinstance(func, ast.Attribute) or func.attr not in SPAWNERS:
        return False
    owner = func.value
    if isinstance(owner, ast.Call):
        return bool(_names(owner.func) & {"get_running_loop", "get_event_loop"})
    owner_names = _names(owner)
    return "asyncio" in owner_names or any("loop" in n.lower() for n in owner_names)


class _Finder(ast.NodeVisitor):
    def __init__(self, file: str) -> None:
        self.file = file
        self.scope: list[str] = []
        self.swallowed: list[str] = []
        self.spawned: list[tuple[str, str]] = []  # (where, enclosing function)

    def _where(self, node: ast.AST) -> str:
        return f"src/tether/{self.file}:{getattr(node, 'lineno', 0)}"

    def _enter(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _enter

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        caught = _names(node.type) & CANCELLATIONS
        if (node.type is None or caught) and not _reraises(node):
            what = "bare except:" if node.type is None else f"except {', '.join(caught)}"
            self.swallowed.append(f"{self._where(node)}: {what} without re-raising")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if _is_suppress(node):
            caught = set().union(*(_names(a) for a in node.args)) & CANCELLATIONS
            if caught:
                self.swallowed.append(f"{self._where(node)}: suppress({', '.join(sorted(caught))})")
        if _spawns(node):
            self.spawned.append(
                (
                    f"{self._where(node)}: {ast.unparse(node.func)}(...) in "
                    f"{'.'.join(self.scope) or '<module>'}",
                    ".".join(self.scope),
                )
            )
        self.generic_visit(node)


def _findings() -> Iterator[_Finder]:
    for path in sorted(PACKAGE.rglob("*.py")):
        finder = _Finder(path.relative_to(PACKAGE).as_posix())
        finder.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        yield finder


def _check(source: str) -> _Finder:
    finder = _Finder("x.py")
    finder.visit(ast.parse(source))
    return finder


def test_the_checks_see_what_they_should() -> None:
    bad = _check(
        "import asyncio, contextlib, anyio\n"
        "async def f(loop, t):\n"
        "    with contextlib.suppress(asyncio.CancelledError): pass\n"
        "    with suppress(KeyError, BaseException): pass\n"
        "    with contextlib.suppress(anyio.get_cancelled_exc_class()): pass\n"
        "    try: pass\n"
        "    except (*GONE, asyncio.CancelledError): pass\n"
        "    try: pass\n"
        "    except BaseException as exc: raise OtherError() from exc\n"
        "    try: pass\n"
        "    except: log()\n"
        "    asyncio.create_task(t)\n"
        "    asyncio.ensure_future(t)\n"
        "    loop.create_task(t)\n"
        "    asyncio.get_running_loop().create_task(t)\n"
    )
    assert len(bad.swallowed) == 6, bad.swallowed
    assert len(bad.spawned) == 4, bad.spawned
    good = _check(
        "import asyncio, contextlib\n"
        "async def f(tg, t):\n"
        "    with contextlib.suppress(Exception, TimeoutError): pass\n"
        "    try: pass\n"
        "    except BaseException:\n"
        "        cleanup()\n"
        "        raise\n"
        "    try: pass\n"
        "    except asyncio.CancelledError as exc:\n"
        "        if t: raise exc\n"
        "    try: pass\n"
        "    except Exception: pass\n"
        "    tg.create_task(t)\n"
        "    tg.start_soon(t)\n"
        "def g(kind: type[BaseException] | None) -> None: ...\n"
    )
    assert good.swallowed == [] and good.spawned == []


def test_no_cancellation_is_swallowed() -> None:
    offences = [line for finder in _findings() for line in finder.swallowed]
    assert not offences, (
        "a cancellation may be swallowed (re-raise it, or catch Exception):\n" + "\n".join(offences)
    )


def test_no_task_is_created_outside_a_task_group() -> None:
    offences = [
        where
        for finder in _findings()
        for where, function in finder.spawned
        if (finder.file, function) not in TASK_ALLOWED
    ]
    assert not offences, (
        "tasks created outside a task group (start them in an anyio "
        "task group, or justify them in TASK_ALLOWED):\n" + "\n".join(offences)
    )


def test_the_allow_list_is_current() -> None:
    """An entry whose task is gone is removed, so the list does not grow stale."""
    used = {(finder.file, function) for finder in _findings() for _, function in finder.spawned}
    assert not set(TASK_ALLOWED) - used, set(TASK_ALLOWED) - used
