"""stillroom data plane: stages, role classes and their Ray wiring. Imports no grpc.

Modules that the control plane also uses (datasets, stage_registry) import neither torch nor ray.
"""
