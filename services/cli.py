"""The `stillroom` command line, on the conventions of `ray job` and kubectl.

    stillroom serve [--address 127.0.0.1:50051] [--tokens-file tokens.yaml] [--ray-address auto]
    stillroom submit examples/audit.yaml [--set stages[0].audit.min_rows=10] [--wait]
    stillroom validate RECIPE | get JOB | list [--state running] [-l key=value] | watch JOB
    stillroom events JOB | cancel JOB | artifacts JOB        (-o json|yaml for machines)

Address and token: --address/--token, or STILLROOM_ADDRESS/STILLROOM_TOKEN.
Exit codes: 0 ok; 1 the job failed or a call was refused; 3 the job was cancelled; 4 the server stayed
unreachable past --reconnect-timeout while watching (the message says where to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from datetime import datetime
from functools import partial
from pathlib import Path

import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from stillroom.services.client import Client, WatchLost, submit_request
from stillroom.services.progress import ProgressView
from stillroom.services.recipes import RecipeError, load
from stillroom.v1 import job_pb2 as pb

STATES = [n.removeprefix("JOB_STATE_").lower() for n in pb.JobState.keys()[1:]]


def _short(enum_type, value: int) -> str:
    name = enum_type.Name(value)
    return name.split("_STATE_")[-1] if "_STATE_" in name else name


def _emit(message_or_list, fmt: str, table) -> None:
    if fmt in ("json", "yaml"):
        data = (
            [MessageToDict(m, preserving_proto_field_name=True) for m in message_or_list]
            if isinstance(message_or_list, list)
            else MessageToDict(message_or_list, preserving_proto_field_name=True)
        )
        print(json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False), end="\n")
    else:
        table(message_or_list)


def _job_table(job: pb.Job) -> None:
    print(f"job      {job.id}   {_short(pb.JobState, job.state)}")
    if job.spec.display_name:
        print(f"name     {job.spec.display_name}")
    if job.labels:
        print("labels   " + ", ".join(f"{k}={v}" for k, v in sorted(job.labels.items())))
    if job.error.reason:
        print(f"error    [{job.error.stage or 'job'}] {job.error.reason}")
    if job.dashboard_url:
        print(f"ray      {job.dashboard_url}  (token: ray get-auth-token)")
    for name in job.actors:
        print(f"actor    {name}")
    for s in job.stages:
        p = s.progress
        prog = f"{p.done}/{p.total} {p.unit}" if p.total else ""
        print(f"  {s.name:<14} {_short(pb.StageState, s.state):<10} {prog:<16} {s.error}")


def _jobs_table(jobs: list[pb.Job]) -> None:
    print(f"{'JOB':<18} {'STATE':<11} {'CREATED':<20} {'STAGES':<30} NAME")
    for j in jobs:
        created = datetime.fromtimestamp(j.create_time.seconds).strftime("%Y-%m-%d %H:%M:%S")
        stages = ",".join(s.name for s in j.stages)
        print(f"{j.id:<18} {_short(pb.JobState, j.state):<11} {created:<20} {stages:<30} {j.spec.display_name}")


def _head(e: pb.Event) -> str:
    return f"[{e.seq:>4}] {datetime.fromtimestamp(e.time.seconds).strftime('%H:%M:%S')}"


def describe_event(e: pb.Event) -> str:
    head = _head(e)
    if e.type == pb.EVENT_TYPE_JOB_STATE:
        return f"{head} job {_short(pb.JobState, e.job_state)}" + (f": {e.message}" if e.message else "")
    if e.type == pb.EVENT_TYPE_STAGE_STATE:
        return f"{head} {e.stage} {_short(pb.StageState, e.stage_state)}" + (f": {e.message}" if e.message else "")
    if e.type == pb.EVENT_TYPE_PROGRESS:
        return f"{head} {e.stage} {e.progress.done}/{e.progress.total} {e.progress.unit}"
    if e.type == pb.EVENT_TYPE_METRICS:
        return f"{head} {e.stage} " + " ".join(f"{k}={v:.4g}" for k, v in sorted(e.metrics.items()))
    if e.type == pb.EVENT_TYPE_ARTIFACT:
        a = e.artifact
        return f"{head} {e.stage} artifact {a.name} ({a.size_bytes} bytes) {a.uri}"
    return f"{head} {e.stage} {e.message}"


def _artifacts_table(arts: list[pb.Artifact]) -> None:
    print(f"{'NAME':<32} {'KIND':<10} {'BYTES':>12}  SHA256")
    for a in arts:
        print(f"{a.name:<32} {a.kind:<10} {a.size_bytes:>12}  {a.sha256[:16]}  {a.uri}")


def _exit_code(job: pb.Job) -> int:
    return {pb.JOB_STATE_SUCCEEDED: 0, pb.JOB_STATE_CANCELLED: 3}.get(job.state, 1)


def _watch(client: Client, job_id: str, args, after: int = 0) -> int:
    """The job's events to its end: raw with -o json|yaml; else a line each, where progress and the
    headline metric fold into one live line per stage (rewritten in place on a terminal)."""
    fmt, view, live_open = args.output, ProgressView(), False
    say = partial(print, file=sys.stderr, flush=True)
    for event in client.watch(job_id, after, args.reconnect_timeout, lambda m: say(f"stillroom: {m}")):
        if fmt in ("json", "yaml"):
            _emit(event, fmt, None)
            continue
        live = view.update(event)
        if live and sys.stdout.isatty():
            print(f"\r\x1b[K{live}", end="", flush=True)
            live_open = True
            continue
        if live_open:
            print()
            live_open = False
        print(f"{_head(event)} {live}" if live else describe_event(event), flush=True)
    job = client.get(job_id)
    if fmt not in ("json", "yaml"):
        _job_table(job)
    return _exit_code(job)


def cmd_serve(args) -> int:
    from stillroom.services.ray_auth import enable_ray_token_auth

    enable_ray_token_auth()  # before ray is imported
    from stillroom.services.limits import Limits
    from stillroom.services.server import Server, ServerConfig, default_home

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServerConfig(
        address=args.address or "127.0.0.1:50051",
        home=args.home or default_home(),
        store_path=args.store,
        artifact_root=args.artifact_root,
        data_roots=args.data_root or [Path.cwd()],
        model_roots=args.model_root or [],
        reward_modules=args.reward_module or [],
        tokens_file=args.tokens_file,
        allow_anonymous=args.allow_anonymous,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        ray_address=args.ray_address,
        runtime_env=args.runtime_env,
        max_running_jobs=args.max_running_jobs,
        retry_backoff_s=args.retry_backoff_s,
        limits=_limits(Limits.load(args.limits), args.max_queued_per_tenant),
        mlflow_hosts=args.mlflow_uri_allow or [],
    )
    Server(cfg).serve_forever()
    return 0


def _limits(limits, max_queued: int | None):
    """--max-queued-per-tenant, where given, sets the default tenant's queue limit."""
    if max_queued is None:
        return limits
    return dataclasses.replace(limits, default=dataclasses.replace(limits.default, max_queued_jobs=max_queued))


def cmd_submit(args, client: Client) -> int:
    spec, labels = load(args.recipe, args.set)
    labels.update(dict(kv.split("=", 1) for kv in args.label))
    return _submit_and_report(client, spec, labels, args)


def _submit_and_report(client: Client, spec: pb.JobSpec, labels: dict, args, note: str = "") -> int:
    """Submit, print the job (or its JSON/YAML), and with --wait watch it to its end."""
    if getattr(args, "dry_run", False):  # the exact request, for any gRPC client (grpcurl -d @)
        _emit(submit_request(spec, args.request_id, labels), args.output if args.output != "table" else "json", None)
        return 0
    resp = client.submit(spec, request_id=args.request_id, labels=labels)
    if args.output in ("json", "yaml"):
        _emit(resp.job, args.output, None)
    else:
        print(f"{'submitted' if resp.created else 'already submitted'} {resp.job.id}{note}")
    return _watch(client, resp.job.id, args) if args.wait else 0


def cmd_resume(args, client: Client) -> int:
    """A new job from an ended one: its spec (or a recipe's) with resume_from set, so the stages
    that finished are reused and the interrupted one goes on from its checkpoints and journal."""
    old = client.get(args.job)
    if args.recipe:
        spec, labels = load(args.recipe, args.set)
    else:
        spec, labels = old.spec, dict(old.labels)
    spec.resume_from = old.id
    return _submit_and_report(client, spec, labels, args, f" (resuming {old.id})")


def cmd_validate(args, client: Client) -> int:
    spec, _ = load(args.recipe, args.set)
    resp = client.validate(spec)
    for w in resp.warnings:
        print(f"warning: {w}")
    print("valid")
    return 0


def cmd_list(args, client: Client) -> int:
    states = [pb.JobState.Value("JOB_STATE_" + s.upper()) for s in args.state]
    labels = dict(kv.split("=", 1) for kv in args.selector)
    jobs = list(client.list(states=states, labels=labels))[: args.limit]
    _emit(jobs, args.output, _jobs_table)
    return 0


def _shows(fetch, table):
    """A command that fetches one thing from the server and prints it (as a table, or -o json|yaml)."""

    def command(args, client: Client) -> int:
        _emit(fetch(client, args), args.output, table)
        return 0

    return command


def cmd_watch(args, client: Client) -> int:
    return _watch(client, args.job, args, args.after)


cmd_get = _shows(lambda c, a: c.get(a.job), _job_table)
cmd_events = _shows(lambda c, a: list(c.events(a.job, a.after)), lambda es: [print(describe_event(e)) for e in es])
cmd_cancel = _shows(lambda c, a: c.cancel(a.job), _job_table)
cmd_artifacts = _shows(lambda c, a: c.artifacts(a.job), _artifacts_table)


def cmd_report(args, client: Client) -> int:
    """Render the job's report from its events, here: report.md and plots/ under --out (printed
    when --out is not given, into a temporary directory)."""
    import tempfile

    from stillroom.actors.common.job_report import render

    job = client.get(args.job)
    events = list(client.events(args.job))
    out = args.out or Path(tempfile.mkdtemp(prefix=f"stillroom-{args.job}-"))
    path = render(job.id, job.spec, events, out)
    if args.out:
        print(f"wrote {path} and {out / 'plots'}/")
    else:
        print(path.read_text(), end="")
        print(f"(plots: {out / 'plots'}/)", file=sys.stderr)
    return 0


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the control service")
    s.add_argument("--address", help="listen address (default 127.0.0.1:50051; port 0 picks one)")
    s.add_argument("--home", type=Path, help="state directory (default $STILLROOM_HOME or ~/.local/share/stillroom)")
    s.add_argument("--store", type=Path, help="SQLite job store (default <home>/jobs.db)")
    s.add_argument("--artifact-root", type=Path, help="where jobs write artifacts (default <home>/artifacts)")
    s.add_argument("--data-root", type=Path, action="append", help="directory jobs may read data from (repeat)")
    s.add_argument("--model-root", type=Path, action="append", help="directory jobs may read models from (repeat)")
    s.add_argument("--reward-module", action="append", help="module reward functions may be imported from (repeat)")
    s.add_argument("--tokens-file", type=Path, help="YAML token table (or $STILLROOM_TOKENS)")
    s.add_argument("--allow-anonymous", action="store_true", help="no auth: one tenant 'default' (local use only)")
    s.add_argument("--tls-cert", type=Path)
    s.add_argument("--tls-key", type=Path)
    s.add_argument("--ray-address", help="join this Ray cluster (default $RAY_ADDRESS, else an embedded one)")
    s.add_argument("--runtime-env", type=Path, help="Ray runtime_env YAML for job actors (cluster/runtime_env.yaml)")
    s.add_argument("--max-running-jobs", type=int, default=2)
    s.add_argument(
        "--retry-backoff-s", type=float, default=10.0, help="first wait before a dead supervisor restarts (doubles)"
    )
    s.add_argument("--max-queued-per-tenant", type=int, help="queued jobs per tenant (default 100; or --limits)")
    s.add_argument(
        "--limits",
        type=Path,
        help="per-tenant ceilings YAML: running/queued jobs, watch streams, steps, tokens, deadline "
        "(services/limits.py documents the keys and their defaults)",
    )
    s.add_argument(
        "--mlflow-uri-allow",
        action="append",
        metavar="HOST[:PORT]",
        help="a host jobs may send MLflow tracking to over http(s) (repeat; default: none)",
    )
    s.add_argument("--log-level", default="info")
    s.set_defaults(fn=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stillroom", description="Fine-tune a teacher, distill a student: one job.")
    sub = p.add_subparsers(dest="command", required=True)

    def client_cmd(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--address", help="host:port (default $STILLROOM_ADDRESS or 127.0.0.1:50051)")
        sp.add_argument("--token", help="API token (default $STILLROOM_TOKEN)")
        sp.add_argument("--tls-ca", help="CA certificate for a TLS server (default $STILLROOM_TLS_CA)")
        sp.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
        sp.set_defaults(fn=fn)
        return sp

    _serve_parser(sub)

    for name, fn, help_ in (("submit", cmd_submit, "submit a recipe"), ("validate", cmd_validate, "validate a recipe")):
        sp = client_cmd(name, fn, help_)
        sp.add_argument("recipe", type=Path)
        sp.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a recipe field")
        if name == "submit":
            sp.add_argument("--request-id", default="", help="idempotency key: resubmitting returns the same job")
            sp.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE")
            sp.add_argument("--dry-run", action="store_true", help="print the SubmitJobRequest, send nothing")
            _wait_args(sp)
    sp = client_cmd("resume", cmd_resume, "a new job that reuses an ended job's finished stages and checkpoints")
    sp.add_argument("job")
    sp.add_argument("recipe", type=Path, nargs="?", help="a changed recipe (default: the job's own spec)")
    sp.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a recipe field")
    sp.add_argument("--request-id", default="")
    _wait_args(sp)
    sp = client_cmd("list", cmd_list, "list jobs, newest first")
    sp.add_argument("--state", action="append", default=[], choices=STATES)
    sp.add_argument("-l", "--selector", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--limit", type=int, default=100)
    for name, fn, help_ in (
        ("get", cmd_get, "show a job and its stages"),
        ("watch", cmd_watch, "stream a job's events until it ends"),
        ("events", cmd_events, "list a job's events"),
        ("cancel", cmd_cancel, "cancel a job"),
        ("artifacts", cmd_artifacts, "list a job's artifacts with sizes and sha256"),
        ("report", cmd_report, "the job's report: stages, evaluation table, audit, training curves"),
    ):
        sp = client_cmd(name, fn, help_)
        sp.add_argument("job")
        if name in ("events", "watch"):
            sp.add_argument("--after", type=int, default=0, help="only events with seq > AFTER")
        if name == "watch":
            _wait_args(sp, flag=False)
        if name == "report":
            sp.add_argument("--out", type=Path, help="write report.md and plots/*.png here")
    return p


def _wait_args(sp, flag: bool = True) -> None:
    if flag:
        sp.add_argument("--wait", action="store_true", help="watch until the job ends; exit with its outcome")
    sp.add_argument(
        "--reconnect-timeout", type=float, default=180.0, help="seconds to keep reconnecting to a lost server"
    )


def _describe_rpc_error(e: grpc.RpcError) -> str:
    lines = [f"error: {e.code().name}: {e.details()}"]
    status = rpc_status.from_call(e) if hasattr(e, "trailing_metadata") else None
    for detail in status.details if status else ():
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            lines += [f"  {v.field}: {v.description}" for v in br.field_violations]
    return "\n".join(lines[:1] if len(lines) == 2 else lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    try:
        with Client(args.address, args.token, args.tls_ca) as client:
            return args.fn(args, client)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(_describe_rpc_error(e), file=sys.stderr)
        return 1
    except WatchLost as e:
        print(f"stillroom: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
