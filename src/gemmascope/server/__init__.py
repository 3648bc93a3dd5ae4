"""The local web UI of a run folder (UI.md): a FastAPI app with a JSON API under `/v1/` and five
pages (feature page, microscope, steer, search, SAEs) whose HTML, JavaScript and CSS ship in
`static/`. `create_app(run_dir)` builds the app; `serve(run_dir, host, port)` runs it with uvicorn.

Knows nothing of training: it reads the run's SAEs, feature index and eval report.
"""

from gemmascope.server.app import create_app, serve, serving

__all__ = ["create_app", "serve", "serving"]
