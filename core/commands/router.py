"""``tokenmill router``: data-parallel replicas behind SGLang's router (we do not write a router).

``tokenmill router [MODEL] --data-parallel-size N`` (the same as ``tokenmill serve
--data-parallel-size N``) starts N ``tokenmill serve`` replicas on consecutive local ports and
``sglang-router`` in front of them on ``--host``/``--port``; ``tokenmill router --worker-urls
URL...`` puts the router in front of replicas that are already running. The routing policy and
the cache-aware balance thresholds are the router's own options, passed through. The router
health-checks every replica and drops one that dies; the others keep serving. SGLang's router
is the optional extra ``tokenmill[router]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

log = logging.getLogger(__name__)

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
INSTALL_HINT = ("data parallelism runs behind SGLang's router, which is not installed: "
                "pip install 'tokenmill[router]' (or: pip install sglang-router)")


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    """The router's options (also accepted by ``tokenmill serve``)."""
    g = p.add_argument_group("data parallelism (SGLang's router)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="replicas of the engine behind SGLang's router (needs tokenmill[router])")
    g.add_argument("--worker-base-port", type=int, default=None,
                   help="first replica's port (default: --port + 1); replica i listens on base + i")
    g.add_argument("--router-policy", default="cache_aware", choices=POLICIES,
                   help="how the router picks a replica (default cache_aware)")
    g.add_argument("--cache-threshold", type=float, default=0.3,
                   help="cache_aware: least prefix match (0-1) to follow affinity (router default 0.3)")
    g.add_argument("--balance-abs-threshold", type=int, default=64,
                   help="cache_aware: balance load when max-min in-flight requests exceeds this (default 64)")
    g.add_argument("--balance-rel-threshold", type=float, default=1.5,
                   help="cache_aware: ...and max > min * this (default 1.5)")
    g.add_argument("--eviction-interval-secs", type=int, default=60,
                   help="cache_aware: seconds between evictions of the router's prefix tree")
    g.add_argument("--max-tree-size", type=int, default=2 ** 26, help="cache_aware: the router's prefix tree size")
    g.add_argument("--health-check-interval-secs", type=int, default=5,
                   help="seconds between the router's health checks of each replica (default 5)")
    g.add_argument("--health-failure-threshold", type=int, default=2,
                   help="failed health checks before the router drops a replica (default 2)")
    g.add_argument("--router-log-level", default="warn", choices=["debug", "info", "warn", "error"])
    g.add_argument("--router-prometheus-port", type=int, default=None,
                   help="port of the router's own Prometheus metrics (default: a free port)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tokenmill.commands.serve import add_arguments as add_serve_arguments

    add_serve_arguments(p)
    p.add_argument("--worker-urls", nargs="+", default=None,
                   help="route to these running replicas instead of starting --data-parallel-size new ones")


def check_installed() -> None:
    try:
        found = importlib.util.find_spec("sglang_router") is not None
    except ImportError:
        found = False
    if not found:
        raise ValueError(INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_argv(args, port: int) -> list[str]:
    """``tokenmill serve`` arguments of one replica: every option the user set, except the front's."""
    from tokenmill.commands.serve import add_arguments as add_serve_arguments

    parser, front = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_serve_arguments(parser)
    add_router_arguments(front)
    front_only = {a.dest for a in front._actions} | {"host", "port"}
    argv = [] if args.model is None else [args.model]
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in front_only or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return [sys.executable, "-m", "tokenmill", "serve", *argv, "--host", "127.0.0.1", "--port", str(port)]


def replica_env(n: int, environ, cpus: int | None = None) -> dict[str, str]:
    """The environment of ``n`` local replicas that share this host's ``cpus`` cores.

    Each gets its share of OpenMP threads (at least one) and passive OpenMP waiting: with
    replicas on shared cores, a spinning worker of one replica takes the core that another
    replica's step needs. What the user set wins.
    """
    env = dict(environ)
    if n >= 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (cpus or os.cpu_count() or 1) // n)))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def router_argv(args, worker_urls: list[str], prometheus_port: int) -> list[str]:
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", args.host, "--port", str(args.port),
            "--worker-urls", *worker_urls, "--policy", args.router_policy,
            "--cache-threshold", str(args.cache_threshold),
            "--balance-abs-threshold", str(args.balance_abs_threshold),
            "--balance-rel-threshold", str(args.balance_rel_threshold),
            "--eviction-interval-secs", str(args.eviction_interval_secs), "--max-tree-size", str(args.max_tree_size),
            "--health-check-interval-secs", str(args.health_check_interval_secs),
            "--health-failure-threshold", str(args.health_failure_threshold),
            "--log-level", args.router_log_level,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus_port)]
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY")
    if api_key:
        argv += ["--api-key", api_key]
    return argv


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _registered(url: str) -> int:
    """How many healthy workers the router at ``url`` has registered."""
    import json

    try:
        with urllib.request.urlopen(url + "/workers", timeout=2) as r:
            return sum(1 for w in json.load(r).get("workers", []) if w.get("is_healthy"))
    except (OSError, ValueError):
        return 0


def _stop(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


class Deployment:
    """N replicas (or given worker URLs) plus the router; :meth:`start` returns once all are healthy."""

    def __init__(self, args):
        check_installed()
        self.args = args
        n = args.data_parallel_size
        if n < 1:
            raise ValueError(f"--data-parallel-size must be a positive integer, got {n}")
        base = args.worker_base_port or args.port + 1
        self.replicas: list[subprocess.Popen] = []
        self.worker_urls = list(getattr(args, "worker_urls", None) or [])
        self._ports = [] if self.worker_urls else [base + i for i in range(n)]
        self.router: subprocess.Popen | None = None
        self.url = f"http://{args.host}:{args.port}"

    def start(self, timeout: float | None = None) -> None:
        try:
            self.start_replicas(timeout)
            self.start_router(timeout)
        except BaseException:
            self.stop()
            raise

    def start_replicas(self, timeout: float | None = None) -> None:
        timeout = timeout or self.args.startup_timeout or 600.0
        env = replica_env(len(self._ports), os.environ)
        for port in self._ports:
            self.replicas.append(subprocess.Popen(replica_argv(self.args, port), env=env))
            self.worker_urls.append(f"http://127.0.0.1:{port}")
        self._wait(self.worker_urls, self.replicas, timeout, "replica")

    def start_router(self, timeout: float | None = None) -> None:
        """Start the router in front of the replicas (again, after :meth:`stop_router`, say with another policy)."""
        prom = self.args.router_prometheus_port or free_port()
        self.router = subprocess.Popen(router_argv(self.args, self.worker_urls, prom))
        self._wait([self.url], [self.router], timeout or 120.0, "router")
        deadline = time.monotonic() + (timeout or 120.0)
        while _registered(self.url) < len(self.worker_urls):  # the router adds workers in the background
            if self.router.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the router did not register the {len(self.worker_urls)} replicas")
            time.sleep(0.25)

    def stop_router(self) -> None:
        if self.router is not None:
            _stop([self.router])
            self.router = None

    def _wait(self, urls, procs, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        pending = list(urls)
        while pending:
            for i, p in enumerate(procs):
                if p.poll() is not None:
                    raise RuntimeError(f"{what} {i} exited during startup (exit code {p.returncode}); see its log")
            pending = [u for u in pending if not _healthy(u)]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{what}(s) {', '.join(pending)} not healthy within {timeout:.0f} s")
            if pending:
                time.sleep(0.5)

    def watch(self) -> int:
        """Block until the router exits or every replica has; a replica that dies is reported once."""
        reported: set[int] = set()
        while True:
            if self.router.poll() is not None:
                log.error("the router exited (code %s)", self.router.returncode)
                return self.router.returncode or 1
            for i, p in enumerate(self.replicas):
                if p.poll() is not None and i not in reported:
                    reported.add(i)
                    print(f"tokenmill router: replica {i} ({self.worker_urls[i]}) exited with code {p.returncode}; "
                          f"the router drops it, {len(self.replicas) - len(reported)} keep serving",
                          file=sys.stderr, flush=True)
            if self.replicas and len(reported) == len(self.replicas):
                print("tokenmill router: every replica has exited", file=sys.stderr, flush=True)
                return 1
            time.sleep(1.0)

    def stop(self) -> None:
        _stop(([self.router] if self.router else []) + self.replicas)


def run(args) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "worker_urls", None) and args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be a positive integer, got {args.data_parallel_size}")
    dep = Deployment(args)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            dep.start()
        except RuntimeError as exc:
            print(f"tokenmill router: error: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"tokenmill router: {len(dep.worker_urls)} replica(s) {' '.join(dep.worker_urls)} behind "
              f"sglang-router ({args.router_policy}) on {dep.url}", flush=True)
        return dep.watch()
    finally:
        dep.stop()
