"""`grpc-router`: serve, route (a gRPC client), eval and lint."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from grpc_router.errors import RouterError
from grpc_router.evaluate.command import register_eval
from grpc_router.evaluate.lint import register_lint
from grpc_router.settings import ConfigError
from grpc_router.types import Message, Role

_ROLE_NAMES = tuple(role.value for role in Role)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grpc-router", description="Route conversations to the policy and LLM that fit."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the gRPC API")
    s.add_argument("--config", type=Path, required=True, help="YAML config (see README)")
    s.set_defaults(func=_cmd_serve)

    r = sub.add_parser("route", help="ask a running server for a routing decision")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("text", nargs="?", help="a single user message")
    src.add_argument(
        "--file",
        type=Path,
        help='JSON conversation: [{"role": "user", "content": "..."}] or '
        '{"messages": [...], "routes": [{"name": ..., "description": ...}]}',
    )
    r.add_argument("--target", default="127.0.0.1:50051", help="host:port (default %(default)s)")
    r.add_argument("--ca", type=Path, help="CA certificate: use TLS")
    r.add_argument("--cert", type=Path, help="client certificate (mTLS)")
    r.add_argument("--key", type=Path, help="client key (mTLS)")
    r.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    r.add_argument("--request-id", default="", help="request id to send")
    r.set_defaults(func=_cmd_route)

    register_eval(sub)
    register_lint(sub)
    return p


def _cmd_serve(args: argparse.Namespace) -> int:
    from grpc_router.serving.server import serve

    try:
        return serve(args.config)
    except ConfigError as e:
        print(f"grpc-router: {e}", file=sys.stderr)
        print("Fix the listed keys and start again.", file=sys.stderr)
        return 2
    except RouterError as e:
        print(f"grpc-router: {e}", file=sys.stderr)
        return 1


def _conversation(args: argparse.Namespace) -> dict[str, Any]:
    if args.text is not None:
        return {"messages": [{"role": "user", "content": args.text}]}
    path: Path = args.file
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SystemExit(f"grpc-router: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"grpc-router: {path} is not valid JSON: {e}") from None
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise SystemExit(
            f"grpc-router: {path}: expected a list of messages or {{'messages': [...]}}"
        )
    return data


def _route_request(conv: dict[str, Any], request_id: str) -> Any:
    from grpc_router.serving.wire import messages_to_pb
    from grpc_router.v1 import router_pb2 as pb

    messages: list[Message] = []
    for i, m in enumerate(conv["messages"]):
        role = str(m.get("role", "")) if isinstance(m, dict) else ""
        if role not in _ROLE_NAMES:
            raise SystemExit(
                f"grpc-router: messages[{i}].role must be one of {', '.join(_ROLE_NAMES)}"
            )
        messages.append(Message(Role(role), str(m.get("content"))))
    routes = [
        pb.RouteDefinition(
            name=str(r.get("name", "")),
            description=str(r.get("description", "")),
            examples=[str(x) for x in r.get("examples", [])],
        )
        for r in conv.get("routes") or []
    ]
    return pb.RouteRequest(messages=messages_to_pb(messages), routes=routes, request_id=request_id)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ca is None:
        return grpc.insecure_channel(args.target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes(),
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None,
    )
    return grpc.secure_channel(args.target, creds)


def _cmd_route(args: argparse.Namespace) -> int:
    from grpc_router.v1 import router_pb2_grpc

    request = _route_request(_conversation(args), args.request_id)
    with _channel(args) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        try:
            response = stub.Route(request, timeout=args.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            name = code.name if code is not None else "ERROR"
            print(f"grpc-router: {name}: {details}", file=sys.stderr)
            if code is grpc.StatusCode.UNAVAILABLE:
                print(f"Is a server running at {args.target}?", file=sys.stderr)
            return 1
    out = json_format.MessageToDict(response, preserving_proto_field_name=True)
    print(json.dumps(out, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
