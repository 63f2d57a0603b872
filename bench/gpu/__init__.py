"""One-command GPU benchmark: devices per GPU, batched cluster vs per-session baseline.

`python -m bench.gpu` (or `make bench-gpu`) builds full-size, randomly
initialised SenseVoiceSmall and ERes2NetV2 (w24s4ep4) model directories,
loads them through the production engines, times the models alone by batch
size, then runs the whole local cluster on the GPU against a sweep of
simulated devices for both designs. See docs/gpu-bench.md.
"""
