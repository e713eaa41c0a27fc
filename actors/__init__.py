"""stillroom data plane (`stillroom.actors`): Ray, torch; imports no grpc.

common/    what both planes use: dataset readers, reward names, the stage registry, the job
           report. Imports neither torch, ray nor grpc: the control plane depends on it alone.
algo/      pure functions and small types: losses, objectives, advantages, filters, built-in rewards
models/    finding and loading models offline (GGUF, 4-bit, LoRA), student initialisation
roles/     the role classes: Generator, RewardScorer, Trainer (plain classes, testable without Ray)
runtime/   the supervisor, the Ray wiring, the generate -> score -> train loop, channels, journal
stages/    one module per stage: audit, sft, grpo, distill, evaluate, export
"""
