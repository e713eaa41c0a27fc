"""One module per stage; each `run(params, spec, ctx)` reads like the algorithm. The registry that
names them lives in common/stages.py (the control plane reads it without importing torch)."""
