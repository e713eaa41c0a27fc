"""Models offline: find and load them (a directory, a .gguf, a file in a package; 4-bit; LoRA), and
make a student from a teacher."""
