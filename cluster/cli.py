"""The `moefleet` command line, in the style of `serve status` and `kubectl scale`.

    moefleet serve SPEC.yaml [--port 50051] [--address local|auto|ray://…] [--detach]
    moefleet status [--server HOST:PORT] [-o table|json|yaml]

Commands that talk to a running service use its admin gRPC API at `--server`
(default `localhost:50051`, or $MOEFLEET_SERVER). Argument parsing only: the work is done by
`service` (bring-up) and the client.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import click
import grpc
import yaml

__all__ = ["main"]

_SERVER = click.option("--server", envvar="MOEFLEET_SERVER", default="localhost:50051",
                       show_default=True, help="HOST:PORT of a running service (or $MOEFLEET_SERVER).")


@click.group()
def main() -> None:
    """moefleet: elastic hosting of Mixture-of-Experts layers on Ray."""


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option("--port", default=50051, show_default=True, help="gRPC port (0 = any free port).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Interface to listen on.")
@click.option("--address", default="local", show_default=True,
              help="`local` (embedded Ray), `auto` (running cluster) or ray://HOST:PORT.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray.")
def serve(spec_path: str, port: int, host: str, address: str, num_cpus: int | None) -> None:
    """Start the service for SPEC and serve until SIGINT/SIGTERM."""
    from .service import connect_ray, start
    from .spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        raise click.UsageError(f"{spec_path}: {e}") from None
    connect_ray(address, num_cpus)
    svc = start(spec, port=port, host=host)
    click.echo(f"moefleet: serving model {spec.name!r} (layers {spec.layers}) on "
               f"{host}:{svc.port}", err=True)
    click.echo(f"{host}:{svc.port}")  # the address alone on stdout, for scripts
    sys.stdout.flush()
    _wait_for_signal()
    click.echo("moefleet: shutting down", err=True)
    svc.shutdown()
    import ray

    ray.shutdown()


@main.command()
@_SERVER
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True)
@click.option("--model", default="", help="Only this model.")
def status(server: str, output: str, model: str) -> None:
    """Show models, layers, experts, replicas, hosts and the routing-table version."""
    from moefleet.client import Client

    from .admin import status_from_proto

    with Client(server, retries=0) as c:
        try:
            resp = c.status(model)
        except grpc.RpcError as e:
            raise click.ClickException(f"{server}: {e.code().name}: {e.details()}") from None
    data = status_from_proto(resp)
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False))
    else:
        click.echo(_status_table(resp))


def _status_table(resp) -> str:
    lines = []
    for m in resp.models:
        lines.append(f"MODEL {m.name}  routing_version={m.routing_version}  dtype={m.dtype}  "
                     f"hidden_size={m.hidden_size}")
        lines.append(f"  {'LAYER':>5}  {'EXPERTS':>7}  {'REPLICAS':>8}  MIN/MAX REPLICAS")
        for layer in m.layers:
            counts = [len(e.replicas) for e in layer.experts] or [0]
            lines.append(f"  {layer.layer:>5}  {len(layer.experts):>7}  {sum(counts):>8}  "
                         f"{min(counts)}/{max(counts)}")
    lines.append(f"{'HOST':<24} {'NODE':<16} {'DEVICE':<8} SLOTS")
    for h in resp.hosts:
        lines.append(f"{h.id:<24} {h.node_ip:<16} {h.device:<8} {h.slots_used}/{h.slots_total}")
    return "\n".join(lines)


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM. The handler only records the signal: taking a lock
    there (Event.set) can deadlock against the main thread waiting on that same lock."""
    got: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: got.append(signum))
    while not got:
        time.sleep(0.2)
