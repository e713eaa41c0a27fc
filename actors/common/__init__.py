"""What the control plane and the data plane share: dataset readers and row validation, reward
names, the stage registry, the job report. Imports neither torch, ray nor grpc (a test checks)."""
