"""The side-by-side page as a FastAPI app (uvicorn serves it, as it serves `python -m serve`).

Routes:
- `GET /`: the judging page; `GET /summary`: the summary page. Both are static HTML whose
  script (`/page.js`) fetches JSON and puts every prompt and completion into the page as
  text (`textContent`), never as HTML, so generated markup shows as written and cannot run.
  A Content-Security-Policy that allows only the page's own script file is a second wall.
- `GET /api/next?annotator=NAME`: the next pair for that annotator, sides unlabelled.
- `POST /api/judge` with `{"annotator", "item", "choice", "reason"}`: records a judgement
  (choice: left, right, tie or both_bad) and answers with the next pair.
- `GET /api/summary`: the summary as JSON (evals/human/stats.py).

A bad request is answered with a 4xx and `{"error": "one sentence"}`; the server stays up.
"""

import pathlib

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from evals.human import stats
from evals.human.store import InputError, Store, check_name

STATIC = pathlib.Path(__file__).with_name('static')
_TYPES = {'.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
          '.css': 'text/css; charset=utf-8'}
_HEADERS = {
    'Content-Security-Policy': "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'",
    'X-Content-Type-Options': 'nosniff',
    'Cache-Control': 'no-store',
}


class Judgement(BaseModel):
  annotator: str
  item: int
  choice: str
  reason: str = ''


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({'error': message}, status_code=status, headers=_HEADERS)


def create_app(store: Store) -> FastAPI:
  """The app over `store` (its items and judgements)."""
  app = FastAPI(title='Kiln side-by-side', docs_url=None, redoc_url=None, openapi_url=None)
  files = {name: (STATIC / name).read_bytes() for name in ('page.html', 'page.js', 'page.css')}

  def static(name: str) -> Response:
    return Response(files[name], media_type=_TYPES[pathlib.Path(name).suffix],
                    headers=_HEADERS)

  @app.exception_handler(InputError)
  async def input_error(_, exc: InputError):
    return _error(exc.status, str(exc))

  @app.exception_handler(RequestValidationError)
  async def validation_error(_, exc: RequestValidationError):
    err = exc.errors()[0]
    if err.get('type') == 'json_invalid':
      return _error(400, 'The request body is not valid JSON.')
    field = '.'.join(str(x) for x in err.get('loc', ()) if x not in ('body', 'query'))
    return _error(400, f'{field or "body"}: {err.get("msg", "invalid value")}.')

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):
    return _error(exc.status_code, str(exc.detail))

  @app.exception_handler(Exception)
  async def internal_error(_, exc: Exception):
    return _error(500, f'Internal error: {type(exc).__name__}: {exc}')

  @app.get('/')
  async def page():
    return static('page.html')

  @app.get('/summary')
  async def summary_page():
    return static('page.html')  # the script shows the summary on this path

  @app.get('/page.js')
  async def script():
    return static('page.js')

  @app.get('/page.css')
  async def style():
    return static('page.css')

  @app.get('/api/next')
  async def next_pair(annotator: str):
    return JSONResponse(store.next_pair(check_name(annotator)), headers=_HEADERS)

  @app.post('/api/judge')
  async def judge(j: Judgement):
    record = await store.judge(j.annotator, j.item, j.choice, j.reason)
    return JSONResponse(store.next_pair(record['annotator']), headers=_HEADERS)

  @app.get('/api/summary')
  async def summary():
    return JSONResponse(stats.summarize(store.judgements, len(store.items)), headers=_HEADERS)

  return app
