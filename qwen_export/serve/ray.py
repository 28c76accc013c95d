"""Scale-out on Ray Serve: the same FastAPI app (:func:`~qwen_export.serve.app.create_app`) as a Ray
Serve deployment with N replicas behind Ray's HTTP proxy, which spreads the requests over them
(Ray's own routing; no load balancer of ours). Each replica loads the artifact itself, so its path
must exist on every node that runs one (the same path, or a shared file system). ``ray`` is an
optional extra (``pip install 'qwen-export[ray]'``) imported only here, lazily.

Single machine: ``qwen-export serve OUT --ray --replicas 2``. A cluster: start Ray on each node
(``ray start --head`` on one, ``ray start --address HEAD:6379`` on the others), then run the same
command with ``RAY_ADDRESS=HEAD:6379`` (README.md, "Serving")."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwen_export.errors import EngineUnavailableError

__all__ = ["deployment", "require_ray", "serve_on_ray"]

INSTALL_HINT = "pip install 'qwen-export[ray]'"
#: the deployment's name in Ray Serve
DEPLOYMENT = "qwen-export"


def require_ray() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise EngineUnavailableError(f"--ray needs Ray Serve; {INSTALL_HINT}") from None
    return serve


class QwenExportReplica:
    """One replica: its app (model loaded in the background at startup, as ``qwen-export serve``)."""

    def __init__(self, artifact: str, settings: Mapping[str, Any], load_options: Mapping[str, Any]) -> None:
        self.artifact, self.settings, self.load_options = artifact, dict(settings), dict(load_options)

    def __serve_build_asgi_app__(self) -> Any:  # called by Ray Serve on the replica, after __init__
        from qwen_export.serve.app import create_app

        return create_app(self.artifact, load_options=self.load_options, **self.settings)


def deployment(
    artifact: str | Path,
    *,
    replicas: int,
    load_options: Mapping[str, Any] | None = None,
    cpus_per_replica: float = 1.0,
    **settings: Any,
) -> Any:
    """The Ray Serve application: ``replicas`` copies of the app over ``artifact`` (``settings``:
    :func:`create_app`'s keyword arguments)."""
    serve = require_ray()
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        from qwen_export.errors import OptionError

        raise OptionError(f"replicas must be an integer >= 1, got {replicas!r}")
    ingress = serve.ingress()(QwenExportReplica)
    options = {"num_cpus": cpus_per_replica}
    app = serve.deployment(ingress, name=DEPLOYMENT, num_replicas=replicas, ray_actor_options=options)
    return app.bind(os.fspath(Path(artifact).resolve()), settings, dict(load_options or {}))


def serve_on_ray(
    artifact: str | Path,
    *,
    replicas: int,
    host: str,
    port: int,
    load_options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> None:
    """Start (or join, with ``RAY_ADDRESS``) Ray, run the deployment behind Ray's proxy on
    ``host:port`` and block until Ctrl-C."""
    import ray

    serve = require_ray()
    app = deployment(artifact, replicas=replicas, load_options=load_options, **settings)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=DEPLOYMENT, route_prefix="/", blocking=True)
