"""The core router: validates a request, asks the engine, applies the routing policy and maps
the decision onto the configured models. It knows engines only through the `Engine` protocol
and upstreams only through `grpc_router.dispatch`."""
