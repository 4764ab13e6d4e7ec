"""The playground: a page at `/` that drives the API from a browser (issue 7).

Plain HTML, JS and CSS shipped inside the package (no build step, nothing fetched from
elsewhere), served without auth: the page itself holds no data, and its API calls carry
the key typed into it.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
# Assets change with every upgrade of the package: revalidate (ETag) rather than let a
# browser keep a stale app.js against a newer server.
NO_CACHE = {"cache-control": "no-cache"}


class _Assets(StaticFiles):
    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(NO_CACHE)
        return response


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=NO_CACHE)


routes: list[BaseRoute] = [
    Route("/", index, methods=["GET"]),
    Mount("/playground", app=_Assets(directory=STATIC), name="playground"),
]
