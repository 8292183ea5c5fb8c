"""The wire: the gRPC server, the RouterService servicer, interceptors and the Envoy ext_proc
servicer. Each translates its protocol into plain types and calls the core router."""
