"""The dashboard: HTML shells and one small script per page, all reading the JSON API.

Pages: ``/`` (queues, workers, counts, throughput, jobs), ``/jobs/{id}`` (images,
parameters, a copyable CLI line), ``/batches/{id}`` (a contact sheet) and ``/login``. Each
page polls the API every 1.5 s; changes go through the API's POST and DELETE routes.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from lorafleet.producer.auth import COOKIE, COOKIE_SECONDS, ApiToken, close_session, find_token, open_session

FOLDER = Path(__file__).parent.parent / "dashboard"  # producer/dashboard: HTML shells, scripts, styles
STATIC = FOLDER / "static"
"""The scripts and the stylesheet, which ``create_app`` mounts at /static."""


PAGES = {
    "index": ("lorafleet", "overview.js"),
    "job": ("job · lorafleet", "job.js"),
    "batch": ("batch · lorafleet", "batch.js"),
}
"""Each page's <main> (in <name>.html), its title and its script, inside layout.html."""
LOGOUT = '<form method="post" action="/logout"><button class="link">log out</button></form>'


def render_pages(tokens: list[ApiToken]) -> dict[str, str]:
    """The dashboard's pages, put together once: the shared layout around each page's body."""
    layout = (FOLDER / "layout.html").read_text()
    pages = {}
    for name, (title, script) in PAGES.items():
        html = layout.replace("{{title}}", title).replace("{{script}}", script)
        html = html.replace("{{logout}}", LOGOUT if tokens else "")  # no login without tokens
        pages[name] = html.replace("{{main}}", (FOLDER / f"{name}.html").read_text())
    return pages


def dashboard(tokens: list[ApiToken], client) -> APIRouter:
    """The pages, the login form and log out, for a fleet with these tokens (none: open)."""
    router = APIRouter(include_in_schema=False)
    pages = render_pages(tokens)

    @router.get("/")
    def overview() -> HTMLResponse:
        return HTMLResponse(pages["index"])

    @router.get("/jobs/{job_id}")
    def job_page(job_id: str) -> HTMLResponse:
        return HTMLResponse(pages["job"])

    @router.get("/batches/{batch_id}")
    def batch_page(batch_id: str) -> HTMLResponse:
        return HTMLResponse(pages["batch"])

    @router.get("/login")
    def login_form() -> FileResponse:
        return FileResponse(FOLDER / "login.html", media_type="text/html")

    @router.post("/login")
    async def login(request: Request):
        form = parse_qs((await request.body()).decode(errors="replace"))
        token = (form.get("token") or [""])[0]
        target = (form.get("next") or ["/"])[0]
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if tokens and find_token(token, tokens) is None:
            return HTMLResponse(
                (FOLDER / "login.html")
                .read_text()
                .replace(
                    "<!--error-->", '<p class="error">That token is not one of LORAFLEET_API_TOKENS.</p>'
                ),
                status_code=401,
            )
        response = RedirectResponse(target, status_code=303)
        if tokens:
            response.set_cookie(
                COOKIE,
                await run_in_threadpool(open_session, client, token),  # Redis: off the event loop
                max_age=COOKIE_SECONDS,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    @router.post("/logout")
    def logout(request: Request) -> RedirectResponse:
        close_session(client, request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    return router
