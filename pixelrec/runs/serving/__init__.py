"""`pixelrec serve`: a run's recommendations over HTTP (FastAPI on uvicorn), loaded once.

- `config.py`   ServeConfig, the options, checked before anything is loaded;
- `snapshot.py` one immutable view of a published run (user tower, item vectors, index, names);
- `engine.py`   queries answered from one snapshot, as `pixelrec retrieve` answers them;
- `batching.py` micro-batching of concurrent requests;
- `uploads.py`  uploaded covers checked and laid out for `index --add-images`;
- `covers.py`   item covers from the configured stores, as JPEG thumbnails (also for `retrieve --html`);
- `static/`     the browsing page at / (one HTML page, a script, a style sheet);
- `service.py`  the current snapshot, its swap, additions;
- `stats.py`    counters and latency percentiles;
- `schemas.py`  the typed request and response bodies;
- `app.py`      the FastAPI application; `server.py` binds, loads and runs uvicorn.

FastAPI and uvicorn are imported only when a server is built.
"""

from .config import ServeConfig
from .server import Started, serve

__all__ = ["ServeConfig", "Started", "serve"]
