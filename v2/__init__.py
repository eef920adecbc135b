"""The Open Inference Protocol (KServe V2), as Triton and KServe speak it: over HTTP on the
server's port (``v2/http.py``) and over gRPC on GRPC_PORT (``v2/grpc_server.py``). Both
reach the tasks through ``v2/core.py``, which splits a request's rows into items of the
task's batcher, with the same admission, limits and deadlines as ``POST /cls``."""
