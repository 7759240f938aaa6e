"""The `moefleet` command line, in the style of `serve status` and `kubectl scale`.

    moefleet serve SPEC.yaml [--port 50051] [--address local|auto|HOST:PORT|ray://…] [--detach]
    moefleet status [-o table|json|yaml] [--model M]
    moefleet shutdown                               stop a (detached) service from anywhere
    moefleet top [--model M]                       live per-layer × per-expert load heatmap
    moefleet scale MODEL --layer L [--expert E] --replicas N
    moefleet add-expert MODEL --layer L --weights FILE.safetensors [--expert E] [--group G]
    moefleet remove-expert MODEL --layer L --expert E
    moefleet rebalance MODEL [--replicas N] [--max-moves N | --min-gain X] [--allow-partial]
    moefleet autoscale MODEL --on|--off [--target-tokens-per-s X] [--min-replicas N] ...
    moefleet simulate SCENARIO.yaml [-o DIR]       compare policies offline (moefleet.sim)

Commands that talk to a running service use its admin gRPC API at `--server`
(default `localhost:50051`, or $MOEFLEET_SERVER) and send `--token` ($MOEFLEET_TOKEN) when
one is set. Argument parsing only: the work is done by `service` (bring-up) and the client.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc
import yaml

__all__ = ["main"]


def _token_options(f: Callable) -> Callable:
    f = click.option("--token-file", envvar="MOEFLEET_TOKEN_FILE", default=None,
                     type=click.Path(exists=True, dir_okay=False),
                     help="Read the admin token from this file (or $MOEFLEET_TOKEN_FILE).")(f)
    return click.option("--token", envvar="MOEFLEET_TOKEN", default=None,
                        help="The admin token (or $MOEFLEET_TOKEN); on a command line it shows in "
                             "the process list, so prefer the file or the variable.")(f)


def _admin_options(f: Callable) -> Callable:
    """--server, the token and TLS options of every command that calls a running service;
    the command gets them as one `conn` argument."""
    @functools.wraps(f)  # keeps f's name, help and the options declared below this one
    def wrapped(server, token, token_file, tls_ca, tls_cert, tls_key, **kw):
        tls = [_read(p) for p in (tls_ca, tls_cert, tls_key)]
        conn = _Conn(server, _token(token, token_file), *tls)
        return f(conn=conn, **kw)

    for opt in (
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="This client's key, for a service that requires client certificates."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="This client's certificate (PEM), for mutual TLS."),
        click.option("--tls-ca", envvar="MOEFLEET_TLS_CA", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="Speak TLS, trusting this CA's certificate (PEM) "
                                        "(or $MOEFLEET_TLS_CA)."),
        _token_options,
        click.option("--server", envvar="MOEFLEET_SERVER", default="localhost:50051",
                     show_default=True, help="HOST:PORT of a running service (or $MOEFLEET_SERVER)."),
    ):
        wrapped = opt(wrapped)
    return wrapped


@dataclass(frozen=True)
class _Conn:
    server: str
    token: str | None
    tls_ca: bytes | None
    tls_cert: bytes | None
    tls_key: bytes | None


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _token(token: str | None, token_file: str | None) -> str | None:
    if token_file is None:
        return token or None
    text = Path(token_file).read_text().strip()
    if not text:
        raise click.UsageError(f"--token-file {token_file} is empty")
    return text


@contextmanager
def _admin(conn: _Conn):
    """A client for one command; gRPC errors become one clear line and exit status 1."""
    from moefleet.client import Client

    with Client(conn.server, retries=0, token=conn.token, tls_ca=conn.tls_ca,
                tls_cert=conn.tls_cert, tls_key=conn.tls_key) as c:
        try:
            yield c
        except grpc.RpcError as e:
            raise click.ClickException(f"{conn.server}: {e.code().name}: {e.details()}") from None


@click.group()
def main() -> None:
    """moefleet: elastic hosting of Mixture-of-Experts layers on Ray."""


@main.command()
@click.argument("spec_path", metavar="[SPEC]", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", type=click.Path(file_okay=False), default=None,
              help="Serve this HF checkpoint directory (config.json + safetensors) instead of a SPEC.")
@click.option("--name", default=None, help="Served model name (default: the spec's, or the "
              "checkpoint directory's name).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Serve in this dtype (default: the spec's, or the checkpoint's stored one).")
@click.option("--hosts", "num_hosts", type=click.IntRange(min=1), default=None,
              help="Expert hosts to start (with --checkpoint; default 1).")
@click.option("--port", default=50051, show_default=True, help="gRPC port (0 = any free port).")
@click.option("--host", default=None, help="Interface to listen on (default: 127.0.0.1 with "
              "--address local, else 0.0.0.0).")
@click.option("--address", default="local", show_default=True,
              help="`local` (embedded Ray), `auto` (running cluster) or ray://HOST:PORT.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray.")
@_token_options
@click.option("--insecure", is_flag=True,
              help="Listen beyond loopback without an admin token (anyone who reaches the port "
                   "may change or stop the service).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve TLS with this certificate chain (PEM); needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The private key (PEM) of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--state-dir", envvar="MOEFLEET_STATE_DIR", default=None,
              help="Where the Controller journals its registry (default: a folder under ~/.moefleet).")
@click.option("--detach", is_flag=True,
              help="Start the service on the cluster and return; it outlives this shell.")
def serve(spec_path: str | None, checkpoint: str | None, name: str | None, dtype: str | None,
          num_hosts: int | None, port: int, host: str | None, address: str, num_cpus: int | None,
          token: str | None, token_file: str | None, insecure: bool, tls_cert: str | None,
          tls_key: str | None, tls_client_ca: str | None, state_dir: str | None,
          detach: bool) -> None:
    """Start the service for SPEC (or an HF --checkpoint) and serve until SIGINT/SIGTERM (or,
    with --detach, return)."""
    from moefleet.cluster.service import check_exposure, connect_ray, start
    from moefleet.core.errors import MoefleetError

    spec = _serve_spec(spec_path, checkpoint, name, dtype, num_hosts)
    host = host or ("127.0.0.1" if address == "local" else "0.0.0.0")
    token = _token(token, token_file)
    try:  # before Ray starts, so the refusal is immediate
        check_exposure(host, token, insecure)
    except ValueError as e:
        raise click.UsageError(f"--host {e}") from None
    tls = _server_tls(tls_cert, tls_key, tls_client_ca)
    if detach and address == "local":
        raise click.UsageError("--detach needs a running cluster (--address auto or HOST:PORT): "
                               "an embedded local Ray ends with this process")
    bar = _LoadBar(spec.name)
    try:
        connect_ray(address, num_cpus)
        svc = start(spec, port=port, host=host, detached=detach, token=token, state_dir=state_dir,
                    on_progress=bar, tls=tls, insecure=insecure)
    except (ConnectionError, RuntimeError, ValueError, MoefleetError) as e:
        bar.close()
        raise click.ClickException(str(getattr(e, "cause", None) or e)) from None
    bar.close(done=True)
    click.echo(f"moefleet: serving model {spec.name!r} (layers {spec.layers}) on "
               f"{', '.join(svc.addresses)}", err=True)
    click.echo(svc.address)  # the address alone on stdout, for scripts
    sys.stdout.flush()
    if detach:
        click.echo(f"moefleet: detached; stop it with `moefleet shutdown --server {svc.address}`",
                   err=True)
        return
    import ray

    ended = svc.watch(_signalled())
    if ended is None:  # a signal
        click.echo("moefleet: shutting down", err=True)
        svc.shutdown()
    ray.shutdown()
    if ended is not None and not ended.startswith("stopped"):
        raise click.ClickException(ended)
    if ended is not None:
        click.echo(f"moefleet: {ended}", err=True)


def _server_tls(cert: str | None, key: str | None, client_ca: str | None):
    from moefleet.router.server import TlsConfig

    if (cert is None) != (key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if cert is None:
        if client_ca is not None:
            raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    return TlsConfig(_read(cert), _read(key), _read(client_ca))


def _serve_spec(spec_path: str | None, checkpoint: str | None, name: str | None, dtype: str | None,
                num_hosts: int | None):
    """The spec `serve` runs: a SPEC file, or one made from an HF checkpoint directory, with
    the command line's overrides."""
    from moefleet.cluster.spec import load_spec, spec_for_checkpoint
    from moefleet.core.config import SpecError

    if (spec_path is None) == (checkpoint is None):
        raise click.UsageError("give a SPEC file or --checkpoint DIR (exactly one)")
    if num_hosts is not None and checkpoint is None:
        raise click.UsageError("--hosts goes with --checkpoint; a SPEC sets hosts.count itself")
    try:
        if checkpoint is not None:
            return spec_for_checkpoint(checkpoint, name=name, dtype=dtype, num_hosts=num_hosts or 1)
        return load_spec(spec_path, **{k: v for k, v in (("name", name), ("dtype", dtype)) if v is not None})
    except SpecError as e:
        raise click.UsageError(f"{spec_path or checkpoint}: {e}") from None


class _LoadBar:
    """The serve command's progress line while experts load: a bar, replicas, bytes, time.
    Redrawn in place on a terminal; elsewhere only the final line is printed."""

    def __init__(self, name: str, width: int = 30):
        self._name, self._width = name, width
        self._tty = sys.stderr.isatty()
        self._last: dict[str, Any] | None = None

    def __call__(self, p: dict[str, Any]) -> None:
        self._last = p
        if self._tty:
            sys.stderr.write("\r" + self._line(p))
            sys.stderr.flush()

    def close(self, done: bool = False) -> None:
        if self._tty and self._last is not None:
            sys.stderr.write("\n")
        if done and self._last is not None:
            p = self._last
            rate = p["bytes"] / max(p["elapsed_s"], 1e-9) / 1e9
            click.echo(f"moefleet: loaded {p['loaded']} expert replicas of {self._name!r}, "
                       f"{p['bytes'] / 1e9:.3f} GB in {p['elapsed_s']:.1f} s ({rate:.2f} GB/s)", err=True)

    def _line(self, p: dict[str, Any]) -> str:
        filled = self._width * p["loaded"] // max(p["total"], 1)
        bar = "#" * filled + "-" * (self._width - filled)
        return (f"loading [{bar}] {p['loaded']}/{p['total']} experts  "
                f"{p['bytes'] / 1e9:.2f}/{p['total_bytes'] / 1e9:.2f} GB  {p['elapsed_s']:.1f} s")


@main.command()
@_admin_options
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True)
@click.option("--model", default="", help="Only this model.")
def status(conn: _Conn, output: str, model: str) -> None:
    """Show models, experts, replicas, load, latency, hosts and the routing-table version."""
    from moefleet.cluster.admin import status_from_proto

    with _admin(conn) as c:
        resp = c.status(model)
    data = status_from_proto(resp)
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False))
    else:
        click.echo(_status_table(resp))


@main.command()
@_admin_options
@click.option("--grace-s", default=5.0, show_default=True,
              help="Seconds in-flight requests get to finish.")
@click.option("--wait-s", default=60.0, show_default=True, help="How long to wait for it to stop.")
def shutdown(conn: _Conn, grace_s: float, wait_s: float) -> None:
    """Stop the service at --server: routers drain, hosts and the Controller end."""
    with _admin(conn) as c:
        models = c.shutdown(grace_s=grace_s).models
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                c.ready(timeout_s=1.0)
            except grpc.RpcError:
                break
            time.sleep(0.2)
        else:
            raise click.ClickException(f"{conn.server} still answers after {wait_s:.0f}s")
    click.echo(f"moefleet: stopped {', '.join(models) or 'the service'} at {conn.server}")


@main.command()
@_admin_options
@click.option("--model", default="", help="Only this model.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", type=int, default=0, help="Stop after N frames (0 = until Ctrl-C).")
def top(conn: _Conn, model: str, interval: float, iterations: int) -> None:
    """A live view: per-layer × per-expert load heatmap with replica counts."""
    from .top import render

    frame = 0
    with _admin(conn) as c:
        while True:
            text = render(c.status(model), width=shutil.get_terminal_size().columns)
            click.echo(("\x1b[H\x1b[2J" if sys.stdout.isatty() else "") + text)
            frame += 1
            if iterations and frame >= iterations:
                return
            time.sleep(interval)


@main.command()
@_admin_options
@click.argument("model")
@click.option("--layer", type=int, required=True)
@click.option("--expert", type=int, default=None, help="The expert; omitted: every expert of the layer.")
@click.option("--replicas", type=click.IntRange(min=1), required=True)
def scale(conn: _Conn, model: str, layer: int, expert: int | None, replicas: int) -> None:
    """Set the replica count of an expert (or of every expert of a layer)."""
    with _admin(conn) as c:
        r = c.scale_expert(model, layer=layer, expert=expert, replicas=replicas)
    what = f"expert {expert}" if expert is not None else "every expert"
    click.echo(f"{model} layer {layer} {what}: {replicas} replica(s) (+{r.replicas_added} "
               f"-{r.replicas_removed}), routing_version {r.routing_version}")


@main.command("add-expert")
@_admin_options
@click.argument("model")
@click.option("--layer", type=int, required=True)
@click.option("--weights", "weights_path", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="safetensors with gate.weight [1,H], gate_proj/up_proj [I,H], down_proj [H,I].")
@click.option("--expert", type=int, default=None, help="The new id (default: the next free one).")
@click.option("--group", type=int, default=None, help="Its group, for group-limited models.")
def add_expert(conn: _Conn, model: str, layer: int, weights_path: str, expert: int | None,
               group: int | None) -> None:
    """Add a routed expert to a layer; prints the new expert's id."""
    with _admin(conn) as c:
        r = c.add_expert(model, layer=layer, safetensors=Path(weights_path).read_bytes(), expert=expert,
                         group=group)
    click.echo(f"moefleet: added expert {r.expert} to {model} layer {layer}, routing_version "
               f"{r.routing_version}", err=True)
    click.echo(r.expert)


@main.command("remove-expert")
@_admin_options
@click.argument("model")
@click.option("--layer", type=int, required=True)
@click.option("--expert", type=int, required=True)
def remove_expert(conn: _Conn, model: str, layer: int, expert: int) -> None:
    """Remove a routed expert: unpublish, drain, free its slots."""
    with _admin(conn) as c:
        r = c.remove_expert(model, layer=layer, expert=expert)
    click.echo(f"{model} layer {layer}: removed expert {expert} ({r.replicas_removed} replica(s)), "
               f"routing_version {r.routing_version}")


@main.command()
@_admin_options
@click.argument("model")
@click.option("--replicas", type=click.IntRange(min=0), default=0,
              help="Total replicas to plan for (0 = keep the current total).")
@click.option("--max-moves", type=click.IntRange(min=0), default=None,
              help="Most replicas moved (0 = no limit; default: the spec's).")
@click.option("--min-gain", type=click.FloatRange(min=0), default=None,
              help="Least drop in per-host load max/mean worth one move (default: the spec's).")
@click.option("--allow-partial", is_flag=True,
              help="Place what fits when not every replica finds a slot (else change nothing).")
def rebalance(conn: _Conn, model: str, replicas: int, max_moves: int | None, min_gain: float | None,
              allow_partial: bool) -> None:
    """Re-plan replicas from the measured per-expert load, with few moves."""
    with _admin(conn) as c:
        r = c.rebalance(model, replicas=replicas, max_moves=max_moves, min_gain=min_gain,
                        allow_partial=allow_partial)
    click.echo(_rebalance_report(model, r))


def _rebalance_report(model: str, r) -> str:
    lines = [f"{model}: moved {r.moves} replica(s) (a plan from scratch: {r.moves_from_scratch}); "
             f"per-host load max/mean {r.host_imbalance_before:.3f} -> {r.host_imbalance_after:.3f}, "
             f"per-replica {r.imbalance_before:.2f} -> {r.imbalance_after:.2f}; "
             f"routing_version {r.routing_version}"]
    if r.moves_uncut != r.moves:
        lines.append(f"  the knob cut {r.moves_uncut - r.moves} move(s): without it "
                     f"{r.moves_uncut} moves to max/mean {r.host_imbalance_uncut:.3f}")
    if r.replicas_placed < r.replicas_requested:
        lines.append(f"  SHORT: placed {r.replicas_placed} of {r.replicas_requested} replicas asked "
                     f"for ({r.replicas_requested - r.replicas_placed} unplaced)")
    return "\n".join(lines)


@main.command()
@_admin_options
@click.argument("model")
@click.option("--on/--off", "enabled", required=True, help="Switch the autoscaler on or off.")
@click.option("--target-tokens-per-s", type=float, default=None)
@click.option("--min-replicas", type=int, default=None)
@click.option("--max-replicas", type=int, default=None)
@click.option("--upscale-delay-s", type=float, default=None)
@click.option("--downscale-delay-s", type=float, default=None)
def autoscale(conn: _Conn, model: str, enabled: bool, **policy: Any) -> None:
    """Switch the per-expert autoscaler and change its policy."""
    with _admin(conn) as c:
        r = c.set_autoscaling(model, enabled=enabled, **policy)
    click.echo(f"{model}: autoscaling {'on' if r.enabled else 'off'}, target "
               f"{r.target_tokens_per_s:g} tokens/s per replica, replicas "
               f"{r.min_replicas}..{r.max_replicas}, delays up {r.upscale_delay_s:g}s / "
               f"down {r.downscale_delay_s:g}s")


@main.command()
@click.argument("scenario", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_dir", default="sim-out", show_default=True,
              help="Folder for summary.json, summary.csv and plots.png.")
def simulate(scenario: str, out_dir: str) -> None:
    """Replay a scenario's load through moefleet's policies and compare them (no cluster)."""
    from moefleet.sim import SpecError, run

    try:
        click.echo(run(scenario, out_dir))
    except SpecError as e:
        raise click.ClickException(f"{scenario}: {e}") from None
    click.echo(f"wrote {out_dir}/summary.json, summary.csv, plots.png")


def _status_table(resp) -> str:
    lines = []
    for m in resp.models:
        a = m.autoscaling
        lines.append(f"MODEL {m.name}  routing_version={m.routing_version}  dtype={m.dtype}  "
                     f"hidden_size={m.hidden_size}  autoscaling={'on' if a.enabled else 'off'}")
        lines.append(f"  requests/s={m.requests_per_s:.1f}  latency p50={m.latency_p50_s * 1e3:.1f}ms "
                     f"p99={m.latency_p99_s * 1e3:.1f}ms")
        lines.append(f"  {'LAYER':>5}  {'EXPERTS':>7}  {'REPLICAS':>8}  {'MIN/MAX':>7}  "
                     f"{'TOKENS/S':>10}  HOTTEST")
        for layer in m.layers:
            counts = [len(e.replicas) for e in layer.experts] or [0]
            tokens = sum(e.tokens_per_s for e in layer.experts)
            hot = max(layer.experts, key=lambda e: e.tokens_per_s, default=None)
            hottest = (f"expert {hot.expert}: {hot.tokens_per_s:.0f}/s on {len(hot.replicas)}"
                       if hot is not None and hot.tokens_per_s > 0 else "-")
            lines.append(f"  {layer.layer:>5}  {len(layer.experts):>7}  {sum(counts):>8}  "
                         f"{min(counts):>3}/{max(counts):<3}  {tokens:>10.0f}  {hottest}")
    lines.append("ROUTERS " + "  ".join(f"{r.name}={r.address}" for r in resp.routers))
    lines.append(f"{'HOST':<24} {'NODE':<16} {'DEVICE':<8} SLOTS")
    for h in resp.hosts:
        lines.append(f"{h.id:<24} {h.node_ip:<16} {h.device:<8} {h.slots_used}/{h.slots_total}")
    return "\n".join(lines)


def _signalled() -> Callable[[], bool]:
    """Record SIGINT and SIGTERM from now on; the result says whether one came. The handler
    only records: taking a lock there (Event.set) can deadlock against the main thread waiting
    on that same lock."""
    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: got.append(signum))
    return lambda: bool(got)
