"""``lenspipe view``: the explorer's web application (Starlette, served by uvicorn).

One page (``static/index.html``) with three views: prompt trajectories, the cache
browser and the tables and findings. It talks to the JSON routes below; every asset is
served from this package or from the installed ``plotly`` package, so the explorer runs
offline. Safe by default: it binds to 127.0.0.1, serves files only from under the data
directory, bounds prompts, and answers a bad request with a 4xx status and a message
(a failure inside with 500 and a message, the traceback going to the server's log only).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import LenspipeError
from .catalog import Catalog
from .errors import BadRequest, NotFound, ViewError

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: Largest request body (a prompt of MAX_PROMPT_CHARS and the run's names fit well within).
MAX_BODY = 16_384
EXTRA = "they are lenspipe's dependencies: pip install -e . (or pip install starlette uvicorn plotly)"


def require_extra() -> None:
    """A clear message, not an ImportError, where the explorer's dependencies are missing
    (an environment installed before they were added, or with --no-deps)."""
    missing = [m for m in ("starlette", "uvicorn", "plotly") if importlib.util.find_spec(m) is None]
    if missing:
        raise LenspipeError(f"the explorer needs {', '.join(missing)}: {EXTRA}")


def plotly_js() -> Path:
    """plotly.js as the installed plotly package ships it (no CDN)."""
    return Path(importlib.util.find_spec("plotly").origin).parent / "package_data" / "plotly.min.js"


class Explorer:
    """What the routes share: the catalog, and per run its loaded lenses, token table and
    store (each loaded on first use, then kept; a lens trained since is loaded with the
    run's others on the next request that needs them)."""

    def __init__(self, cfg):
        self.catalog = Catalog(cfg)
        self.cfg = cfg
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self._cache: dict[tuple, Any] = {}

    def _once(self, key: tuple, make):
        """``make()`` once per key: two first requests load a model once, while requests for
        what is loaded already, or for another run, do not wait."""
        if key in self._cache:
            return self._cache[key]
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    def lenses(self, model: str, corpus: str):
        from .live import load_run, run_inputs

        lens_dirs = self.catalog.lens_dirs(model, corpus)

        def make():
            model_dir, separator = run_inputs(self.catalog.artifacts(model, corpus))
            return load_run(model_dir, lens_dirs, separator)

        return self._once(("lenses", model, corpus, *sorted(lens_dirs)), make)

    def tokenizer(self, model: str, corpus: str):
        from transformers import AutoTokenizer

        model_dir = self.catalog.artifacts(model, corpus).need("model_dir")
        return self._once(("tokenizer", str(model_dir)), lambda: AutoTokenizer.from_pretrained(model_dir))

    def store(self, model: str, corpus: str):
        from ..store.reader import open_store

        return self._once(
            ("store", model, corpus), lambda: open_store(self.catalog.artifacts(model, corpus).need("store"))
        )

    def tokens(self, model: str, corpus: str):
        from .tokens import build_token_table

        def make():
            artifacts = self.catalog.artifacts(model, corpus)
            kinds = self.catalog.lens_dirs(model, corpus)
            translator = self.cfg.for_model(model).analyses.translator
            if translator not in kinds:
                translator = next(iter(kinds), None)
            if translator is None:
                raise NotFound(
                    f"no trained lens of {model}/{corpus}: run "
                    f"`lenspipe train --model {model} --corpus {corpus} --kind affine`"
                )
            return build_token_table(artifacts, translator, self.tokenizer(model, corpus))

        return self._once(("tokens", model, corpus), make)


# ------------------------------------------------------------------------ requests


def _text(params, name: str, required: bool = True, limit: int = 200) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise BadRequest(f"missing {name!r}")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequest(f"{name!r} must be a string of at most {limit} characters")
    return value


def _int(params, name: str, default: int | None) -> int | None:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"{name!r} must be an integer, not {str(raw)[:40]!r}") from None


def _answer(handler):
    """A route's JSON answer; its user errors as 4xx JSON, anything else as 500 + message."""
    from starlette.responses import JSONResponse

    @functools.wraps(handler)
    def route(explorer: Explorer, request, *args):
        try:
            return JSONResponse(handler(explorer, request, *args))
        except ViewError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except LenspipeError as e:  # a missing or unusable artifact: its message names the command
            return JSONResponse({"error": str(e)}, status_code=404)
        except Exception as e:  # a bug: the server lives on; the traceback goes to its log
            log.exception("explorer request %s failed", request.url.path)
            return JSONResponse({"error": f"internal error ({type(e).__name__}): {e}"}, status_code=500)

    return route


def _run_of(params) -> tuple[str, str]:
    return _text(params, "model"), _text(params, "corpus")


@_answer
def runs(explorer: Explorer, request) -> dict:
    return {"runs": explorer.catalog.runs(), "data_dir": str(explorer.catalog.data_dir)}


@_answer
def metrics(explorer: Explorer, request) -> dict:
    return explorer.catalog.layer_metrics()


@_answer
def findings(explorer: Explorer, request) -> dict:
    return explorer.catalog.findings()


@_answer
def trajectory(explorer: Explorer, request, body: Any) -> dict:
    from .live import MAX_PROMPT_CHARS, prompt_trajectory

    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"model": ..., "corpus": ..., "prompt": ...}')
    prompt = _text(body, "prompt", limit=MAX_PROMPT_CHARS)
    if not prompt.strip():
        raise BadRequest("the prompt is empty")
    return prompt_trajectory(explorer.lenses(*_run_of(body)), prompt)


@_answer
def tokens(explorer: Explorer, request) -> dict:
    from .tokens import page

    q = request.query_params
    known = {"model", "corpus", "sort", "desc", "offset", "limit"}
    sort, desc = _text(q, "sort", required=False) or "index", q.get("desc", "false") == "true"
    offset, limit = _int(q, "offset", 0), _int(q, "limit", 50)
    table = explorer.tokens(*_run_of(q))
    return page(table, {k: v for k, v in q.items() if k not in known}, sort=sort, desc=desc, offset=offset, limit=limit)


@_answer
def token(explorer: Explorer, request) -> dict:
    from .live import stored_trajectory
    from .tokens import context

    q = request.query_params
    model, corpus = _run_of(q)
    index = _int(q, "index", None)
    if index is None:
        raise BadRequest("missing 'index' (a token of the evaluated split's store)")
    store = explorer.store(model, corpus)
    if not 0 <= index < store.n_tokens:
        raise NotFound(f"token {index} is not in the store ({store.n_tokens} tokens)")
    run = explorer.lenses(model, corpus)
    out = stored_trajectory(run, store, index)
    out["context"] = context(store, index, run.tokenizer)  # the store already open
    return out


# ------------------------------------------------------------------------ the application


def create_app(cfg, host: str = "127.0.0.1"):
    """The Starlette application over one config's data directory, answering requests
    addressed to ``host`` (and to this machine by its loopback names)."""
    require_extra()
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    explorer = Explorer(cfg)

    def bind(handler):
        return lambda request: handler(explorer, request)

    async def post_trajectory(request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # also what keeps another site's page from posting here (a cross-site form cannot)
            return JSONResponse({"error": "send the request as application/json"}, status_code=415)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                return JSONResponse({"error": f"the request is over {MAX_BODY} bytes"}, status_code=413)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(trajectory, explorer, request, body)

    def files(request):
        try:
            return FileResponse(explorer.catalog.file(request.path_params["path"]))
        except NotFound as e:
            return JSONResponse({"error": str(e)}, status_code=404)

    async def not_found(request, exc):
        return JSONResponse({"error": f"no such page: {request.url.path}"}, status_code=404)

    async def bad_method(request, exc):
        return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}"}, status_code=405)

    routes = [
        Route("/", lambda request: FileResponse(STATIC / "index.html")),
        Route("/static/plotly.min.js", lambda request: FileResponse(plotly_js())),
        Mount("/static", StaticFiles(directory=STATIC)),
        Route("/api/runs", bind(runs)),
        Route("/api/metrics", bind(metrics)),
        Route("/api/findings", bind(findings)),
        Route("/api/trajectory", post_trajectory, methods=["POST"]),
        Route("/api/tokens", bind(tokens)),
        Route("/api/token", bind(token)),
        Route("/files/{path:path}", files),
    ]
    # only requests addressed to this machine by name: a page elsewhere cannot reach the
    # explorer through a DNS name rebound to 127.0.0.1
    hosts = ["127.0.0.1", "localhost", "[::1]", "::1", *([] if host in ("0.0.0.0", "::") else [host])]
    return Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: bad_method},
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=["*"] if host in ("0.0.0.0", "::") else hosts)],
    )


def serve(cfg, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the explorer until interrupted."""
    require_extra()
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the explorer listens on %s: anyone who can reach this machine can use it", host)
    app = create_app(cfg, host)
    print(f"lenspipe view: http://{'[' + host + ']' if ':' in host else host}:{port}/  (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
