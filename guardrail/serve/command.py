"""`guardrail serve`: start the HTTP service from a Serve config file (deploy/serve.yaml).

    server = serve("/tmp/m", block=False)     # local Ray on this machine, proxy on 127.0.0.1:8000
    ...                                        # ready: GET /healthz answered 200
    server.stop()

`backend="ray"` (default) starts a local Ray unless one is running or `ray_address` names a
cluster; `backend="local"` runs the same FastAPI app in-process with uvicorn, without Ray, and
takes `port=0` (a free port, bound by the server: read it from `Server.url`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from guardrail.errors import ModelError, UsageError
from guardrail.serve.config_keys import explain, read_checked
from guardrail.serve.settings import ServiceSettings
from guardrail.shipped import shipped

DEFAULT_CONFIG = shipped("deploy", "serve.yaml")


class Server:
    """A running service: its base URL (with the port it listens on), and `stop()`
    (idempotent)."""

    def __init__(self, url: str, stop: Callable[[], None]):
        self.url = url
        self._stop: Callable[[], None] | None = stop

    def stop(self) -> None:
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()


@dataclass(frozen=True)
class ServeConfig:
    """The parts of a Serve config file that `serve` uses, with the overrides applied."""

    host: str
    port: int
    http_options: dict[str, Any]
    proxy_location: str | None
    app_name: str
    route_prefix: str
    settings: ServiceSettings
    deployments: dict[str, dict[str, Any]]


def serve(model: str | None = None, config: str | os.PathLike | None = None,
          host: str | None = None, port: int | None = None, *, backend: str = "ray",
          ray_address: str | None = None, num_gpus: float | None = None,
          api_keys: list[str] | None = None, jobs_db: str | None = None,
          policies_dir: str | None = None, block: bool = True,
          ready_timeout_s: float = 600.0) -> Server | None:
    """Start the service; ready when GET /healthz answers 200. Blocks until SIGINT/SIGTERM
    when `block`, else returns a `Server` to stop it. Raises UsageError for bad settings."""
    if backend == "ray" and block and "ray" not in sys.modules:
        # NOTE: Ray's C++ failure-signal handler (read when ray loads) turns SIGTERM into an
        # abort a few seconds later, which cut the drain short (6 of 8 in-flight requests
        # answered); off for the service we run, so SIGTERM drains in-flight requests.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    cfg = load_config(config, model=model, host=host, port=port, api_keys=api_keys,
                      jobs_db=jobs_db, policies_dir=policies_dir)
    cfg.settings.check_auth()
    # caught from here on: a SIGTERM while starting still drains and exits cleanly
    stopping = _catch_signals(threading.Event(), signal.SIGTERM) if block else None
    if backend not in ("ray", "local"):
        raise UsageError(f"backend must be ray or local, not {backend!r}")
    if backend == "ray" and cfg.port == 0:  # the proxy would bind a port nobody can learn
        raise UsageError("port 0 (any free port) needs backend local; give Ray a port")
    try:
        if backend == "ray":  # the proxy serves the application under its route prefix
            stop = _start_ray(cfg, ray_address, num_gpus)
            if stopping is not None:      # ray.init put its own (exit at once) over ours
                _catch_signals(stopping, signal.SIGTERM)
            url = f"http://{_url_host(cfg.host)}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        else:
            stop, bound = _start_local(cfg)
            url = f"http://{_url_host(cfg.host)}:{bound}"
    except KeyboardInterrupt:  # Ctrl-C while starting: the backend has cleaned up
        return None
    try:
        wait_ready(url, ready_timeout_s)
    except BaseException as err:
        stop()
        if isinstance(err, KeyboardInterrupt):
            return None
        raise
    if not block:
        return Server(url, stop)
    print(f"guardrail: serving on {url} (backend {backend}); Ctrl-C stops", file=sys.stderr)
    assert stopping is not None
    _catch_signals(stopping, signal.SIGINT)          # Ctrl-C: the same graceful stop now
    while not stopping.wait(1.0):
        pass
    print(f"guardrail: stopping; requests in flight get up to "
          f"{cfg.settings.load.drain_timeout_s:g} s to finish", file=sys.stderr)
    stop()
    print("guardrail: stopped", file=sys.stderr)
    return None


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServeConfig:
    """Read a Serve config (validated as Ray validates it) and apply the overrides that are
    not None: model, host, port (0: any free port), api_keys, jobs_db, policies_dir."""
    from ray.serve.schema import ServeDeploySchema

    source = Path(path) if path is not None else DEFAULT_CONFIG
    raw: dict[str, Any] = {}
    lines: dict = {}
    if path is not None or source.exists():
        try:
            text = source.read_text()
        except OSError as err:
            raise UsageError(f"{source}: cannot read the Serve config ({_first_line(err)})") \
                from None
        raw, lines = read_checked(text, str(source))      # unknown keys: one line each
        try:
            schema = ServeDeploySchema.model_validate(raw)
        except ValueError as err:
            raise UsageError(explain(err, str(source), lines)) from None
        if len(schema.applications) != 1:
            raise UsageError(f"{source}: expected exactly one application")
    apps = raw.get("applications") or [{}]
    app = apps[0]
    http = dict(raw.get("http_options") or {})
    host = overrides.get("host") or http.get("host") or "127.0.0.1"
    port = next((int(p) for p in (overrides.get("port"), http.get("port")) if p is not None), 8000)
    args = dict(app.get("args") or {})
    args["host"] = host
    for key in ("model", "api_keys", "policies_dir"):
        if overrides.get(key) is not None:
            args[key] = overrides[key]
    jobs = dict(args.get("jobs") or {})
    override = overrides.get("jobs_db")
    if override and "://" in override:
        jobs["db_url"] = override
    jobs["db_path"] = os.path.abspath((override if override and "://" not in override else None)
                                      or jobs.get("db_path") or "guardrail-jobs.sqlite")
    url = jobs.get("db_url")
    if isinstance(url, str) and url.startswith("sqlite:///"):   # replicas start elsewhere
        jobs["db_url"] = "sqlite:///" + os.path.abspath(url.removeprefix("sqlite:///"))
    args["jobs"] = jobs
    if args.get("policies_dir"):
        args["policies_dir"] = os.path.abspath(args["policies_dir"])
    try:
        settings = ServiceSettings.model_validate(args)
    except ValueError as err:
        raise UsageError(explain(err, str(source), lines, ("applications", 0, "args"))) \
            from None
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"}
                   for d in app.get("deployments") or []}
    return ServeConfig(host, port, {**http, "host": host, "port": port},
                       raw.get("proxy_location"), app.get("name", "guardrail"),
                       app.get("route_prefix", "/"), settings, deployments)


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll GET /healthz until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/healthz", timeout=5)
            if reply.status_code == 200:
                return
            last = f"HTTP {reply.status_code}"
        except httpx.HTTPError as err:
            last = type(err).__name__
        time.sleep(0.25)
    raise ModelError(f"the service at {url} was not ready after {timeout_s:g} s ({last})")


# --- backends ----------------------------------------------------------------------------------


def _start_ray(cfg: ServeConfig, address: str | None, num_gpus: float | None) -> Callable[[], None]:
    import ray
    from ray import serve as ray_serve

    from guardrail.adapters.registry import locate_model
    from guardrail.serve.deployment import INGRESS, MODEL, GuardIngress, GuardModel

    started = not ray.is_initialized()
    if started and not address:
        _bind(cfg.host, cfg.port).close()  # else a running Serve may own the port already
    # a missing or unreadable model is one line here, not a replica failing inside Ray
    locate_model(cfg.settings.model)
    # Ray's own lines (its actors' logs, Serve's progress) go to Ray's log files, not to this
    # console: the console shows ours, and where Ray's are
    quiet = {"include_dashboard": False, "logging_level": "error", "log_to_driver": False}
    if started and address:
        ray.init(address=address, **quiet)
    elif started:
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), **quiet)
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    logs = _ray_logs()
    if started and logs:
        print(f"guardrail: Ray's own logs are in {logs}", file=sys.stderr)

    def stop() -> None:
        """Drain first: the ingress answers new requests 503 with Retry-After and finishes the
        ones it holds (up to the drain timeout). Then our own local Ray goes entirely; on a Ray
        we did not start, only our application (its route answers 404 from then on)."""
        drain = cfg.settings.load.drain_timeout_s
        with suppress(Exception):  # Serve may not have started
            ingress = ray_serve.get_deployment_handle(INGRESS, cfg.app_name)
            ingress.drain.remote(drain).result(timeout_s=drain + 10)
        if started and not address:
            # NOTE: not `delete` first: it drops the route at once, and the proxy answered 404
            # until Serve stopped. `shutdown` stops the proxy before it drops routes (new
            # connections are refused), while the replicas still end gracefully.
            ray_serve.shutdown()
        else:
            with suppress(Exception):
                ray_serve.delete(cfg.app_name)
        if started:
            ray.shutdown()

    try:
        model_opts = dict(cfg.deployments.get(MODEL, {}))
        actor = dict(model_opts.get("ray_actor_options") or {})
        if num_gpus is not None or "num_gpus" not in actor:
            actor["num_gpus"] = num_gpus if num_gpus is not None else _local_gpus()
        model_opts["ray_actor_options"] = actor
        have = ray.cluster_resources().get("GPU", 0)
        if actor["num_gpus"] > have and not address:
            raise UsageError(f"{MODEL} asks for {actor['num_gpus']} GPU(s); this Ray has {have}")
        data = cfg.settings.model_dump(mode="json")
        drain = {"graceful_shutdown_timeout_s": cfg.settings.load.drain_timeout_s}
        model = GuardModel.options(**{**drain, **model_opts}).bind(data)
        app = GuardIngress.options(**{**drain, **cfg.deployments.get(INGRESS, {})}).bind(
            model, data)
        ray_serve.start(http_options=cfg.http_options, proxy_location=cfg.proxy_location)
        ray_serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
    except BaseException as err:
        stop()
        if isinstance(err, RuntimeError):
            where = f"; the replicas' logs are in {logs}" if logs else ""
            raise ModelError(f"the application did not start ({_first_line(err)}){where}"
                             ) from None
        raise
    return stop


def _start_local(cfg: ServeConfig) -> tuple[Callable[[], None], int]:
    """Uvicorn in a thread on a socket bound here (so port 0 works); returns (stop, port)."""
    import uvicorn

    from guardrail.serve.app import create_app
    from guardrail.serve.judge import LocalJudge, load_engine

    sock = _bind(cfg.host, cfg.port)
    try:
        s = cfg.settings
        app = create_app(LocalJudge(load_engine(s), s.load.max_queued, s.load.retry_after_s), s)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    drain = s.load.drain_timeout_s
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=drain))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="guardrail-uvicorn", daemon=True)
    thread.start()

    def stop() -> None:
        """Graceful: the socket stops accepting at once, in-flight requests finish (up to the
        drain timeout), then the lifespan ends (running jobs are released to the queue)."""
        server.should_exit = True
        thread.join(timeout=drain + 30)
        sock.close()

    return stop, port


# --- helpers -----------------------------------------------------------------------------------


def _ray_logs() -> str | None:
    """The folder of this Ray session's log files, where Ray can tell."""
    try:
        import ray

        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private API: no path is better than no service
        return None


def _local_gpus() -> int:
    try:
        import torch

        return 1 if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); UsageError when that address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({err.strerror})") from None
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _catch_signals(done: threading.Event, *signals: int) -> threading.Event:
    """These signals set `done` instead of ending the process."""
    for sig in signals:
        signal.signal(sig, lambda *_: done.set())
    return done


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
