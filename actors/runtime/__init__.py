"""How a job runs: the supervisor, the Ray wiring (names, resources, restarts, placement), the
generate -> score -> train loop, the channels between roles and the teacher's journal."""
