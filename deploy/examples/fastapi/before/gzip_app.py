"""The example's routes (../app.py) compressing their own responses, as FastAPI's middleware
docs show first: Starlette's GZipMiddleware. bench.sh --gzip measures it against app.py behind
gatehouse's `compress` (benches/compare/configs/gzip-gatehouse.toml), at the same gzip level.

    GZIP_LEVEL=6 uvicorn gzip_app:app --app-dir before --port 8000
"""

import importlib.util
import os
from pathlib import Path

from starlette.middleware.gzip import GZipMiddleware

# ../app.py, loaded by path: this directory's app.py is also a module named "app".
_spec = importlib.util.spec_from_file_location("example_routes", Path(__file__).resolve().parent.parent / "app.py")
_routes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_routes)
app = _routes.app

# gatehouse's `compress` skips bodies under min_size = "1KiB"; the level is zlib's 1-9
# (Starlette's default is 9, the slowest; gatehouse's `default` is 6).
app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=int(os.environ.get("GZIP_LEVEL", "6")))
