"""xds-protos next to the other protobuf packages in one process.

xds-protos installs its own `google/api`, `google/rpc`, `google/type`, ... modules and a
`google/__init__.py`; protobuf, grpcio-health-checking, grpcio-reflection and our generated
grpc_router.v1 stubs share the `google` namespace and the default descriptor pool. A clash shows
up as an import error or a "duplicate file name" TypeError, so a fresh interpreter imports them
all, in the order the server does (ours first), and round-trips a message of each.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

SCRIPT = textwrap.dedent(
    """
    import importlib
    from importlib import metadata

    # The server's own imports first, as in grpc_router.serving.server.
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2
    from grpc_router.v1 import router_pb2
    from google.protobuf import any_pb2, struct_pb2, descriptor_pool

    # Then every module xds-protos ships (except its `test` package, which the stdlib's
    # `test` package shadows).
    modules = sorted(
        str(f)[:-3].replace("/", ".")
        for f in metadata.files("xds-protos")
        if str(f).endswith("_pb2.py") and not str(f).startswith("test/")
    )
    for name in modules:
        importlib.import_module(name)

    from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
    from envoy.config.core.v3 import base_pb2
    from google.rpc import status_pb2

    request = ext_proc.ProcessingRequest(
        request_headers=ext_proc.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/")])
        )
    )
    request.attributes["envoy.filters.http.ext_proc"].update({"request.size": 12})
    assert ext_proc.ProcessingRequest.FromString(request.SerializeToString()) == request

    status = status_pb2.Status(code=14, message="x")
    status.details.add().Pack(request)
    back = status_pb2.Status.FromString(status.SerializeToString())
    unpacked = ext_proc.ProcessingRequest()
    assert back.details[0].Unpack(unpacked) and unpacked == request

    health = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    assert health_pb2.HealthCheckResponse.FromString(health.SerializeToString()) == health
    ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol=ext_proc.DESCRIPTOR.name)
    assert reflection_pb2.ServerReflectionRequest.FromString(ask.SerializeToString()) == ask
    route = router_pb2.RouteRequest()
    assert router_pb2.RouteRequest.FromString(route.SerializeToString()) == route

    pool = descriptor_pool.Default()
    for name in ("google/protobuf/any.proto", health_pb2.DESCRIPTOR.name,
                 reflection_pb2.DESCRIPTOR.name,
                 "envoy/service/ext_proc/v3/external_processor.proto",
                 "grpc_router/v1/router.proto", "validate/validate.proto"):
        pool.FindFileByName(name)
    # Reflection can describe the ext_proc service from the shared pool.
    pool.FindServiceByName("envoy.service.ext_proc.v3.ExternalProcessor")
    print(len(modules))
    """
)


def test_xds_protos_does_not_replace_protobufs_own_files() -> None:
    shipped = {str(f) for f in metadata.files("xds-protos") or ()}
    assert not {f for f in shipped if f.startswith("google/protobuf/")}
    # Its google/__init__.py must keep `google` a namespace shared with protobuf.
    init = next(f for f in metadata.files("xds-protos") or () if str(f) == "google/__init__.py")
    assert "extend_path" in init.read_text()


def test_all_protobuf_packages_load_and_round_trip_in_one_process() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 500
