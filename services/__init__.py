"""stillroom control plane: the gRPC JobService, the job store, the dispatcher, the CLI and SDK.

Imports no torch: the data plane lives in `actors/` (`stillroom.actors`); this package uses only its light
`stillroom.actors.common` and the Ray wiring.
"""
