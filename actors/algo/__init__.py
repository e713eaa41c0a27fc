"""Pure functions (and small frozen types): losses, objectives, advantages, distillation filters,
built-in rewards. No Ray, no I/O; tensor shapes in every docstring."""
