"""`paligemma serve`: an HTTP server over the continuous-batching engine (`paligemma.fast.engine`).

    from paligemma.fast import PaliGemma
    from paligemma.serve import build_app, Limits
    model = PaliGemma.load("demo-model.npz", "demo-tokenizer.model")
    app = build_app(model, model.engine(slots=8), "paligemma-demo", Limits())   # an ASGI app

`inputs` checks requests, `outputs` turns ids into streamed text and detected objects, `metrics`
counts for Prometheus, `app` holds the routes; `static/` is the page at /. This package sits
above `paligemma.fast`; nothing in `fast` or `ref` imports it. docs/serving.md has the API.
"""

from .app import build_app
from .inputs import ApiError, Limits

__all__ = ["build_app", "ApiError", "Limits"]
