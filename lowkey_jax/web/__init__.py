"""``lowkey-jax serve``: a local, offline web page to cloak photos (needs the ``web`` extra).

``pip install -e ".[web]"`` installs Starlette, uvicorn and python-multipart. The page and
its API are in :mod:`lowkey_jax.web.app`; :func:`serve` runs them with uvicorn.
"""

from __future__ import annotations

import threading
import webbrowser

__all__ = ["serve", "url_for"]


def url_for(host: str, port: int) -> str:
    """The address to open in a browser for a server bound to ``host:port``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def serve(host: str = "127.0.0.1", port: int = 8000, open_browser: bool = True, **app_kwargs) -> None:
    """Run the web app until Ctrl-C. ``app_kwargs`` go to :func:`lowkey_jax.web.app.create_app`."""
    import uvicorn

    from lowkey_jax.web.app import allowed_hosts_for, create_app

    app = create_app(allowed_hosts=allowed_hosts_for(host, port), **app_kwargs)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", proxy_headers=False,
                            server_header=False, date_header=False, lifespan="on")
    server = uvicorn.Server(config)
    url = url_for(host, port)
    print(f"lowkey-jax web app: {url}  (photos stay on this machine; Ctrl-C to stop)", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    server.run()
