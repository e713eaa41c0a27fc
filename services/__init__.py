"""stillroom control plane: the gRPC JobService, the job store, the dispatcher, the CLI and SDK.

Imports no torch: the data plane lives in `actors/`.
"""
