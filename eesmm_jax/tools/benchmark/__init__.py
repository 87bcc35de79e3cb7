"""Timing tables: SimMIM vs EESMM train steps, in JAX and in the PyTorch reference.

    python -m eesmm_jax.tools.benchmark --preset cpu-small --out /tmp/timing     # ~5 min on 2 cores
    python -m eesmm_jax.tools.benchmark --preset gpu --out /tmp/timing           # the paper's sizes
    python -m eesmm_jax.tools.benchmark --preset gpu --methods eesmm2 --backbones swin_base \\
        --sizes 224/7 --torch none --out /tmp/one_cell                     # one cell

Grid: method (SimMIM = EESMM n=1, EESMM n=2, n=3) x backbone x image/window size. Every cell
trains on the same `--batch` images per step (SimMIM: that many encoder inputs, EESMM: batch / n
blends), so images/s compare methods directly. Per cell: compile time, the median of `--steps`
timed steps after `--warmup` (each step ends in `block_until_ready`), images/s (and per device),
XLA's FLOPs per image (of the step as lowered, before optimisation: the compiled GPU program's
count misses the matmuls that became cuBLAS calls), MFU against `PEAK_FLOPS` (null where the
device is not in the table, e.g. CPUs), peak memory and its source, and GPU-hours per ImageNet
epoch and per 800 epochs.

How cells share the machine (`--interleave`, recorded as `timing` in every cell): the cells of
one backbone and size each run in a process of their own and are timed a step of each in turn
(cpu-small), or one after another in this process (gpu).

Data: by default one batch of random images lives on the device and every step reuses it, so the
input pipeline is not timed; `--data cifar10` (or imagenet2012 / folder with `--data_dir`) feeds
the real tf.data pipeline and its host-to-device copy inside the timed step instead.

The PyTorch reference (`--torch eager,compile`) is SimMIM's step as microsoft/SimMIM runs it:
timm's Swin with a mask token, a 1x1 Conv2d + PixelShuffle head, the masked L1 loss, gradient
clipping at 5 and AdamW, at the same batch, resolution and dtype (torch.autocast for bf16/fp16).
There is no PyTorch EESMM, so each torch row is the SimMIM baseline of its (backbone, size).

`--out DIR` writes timing.json (one object per cell), timing.md (the table, the paper's numbers
beside ours with their units) and timing.png (images/s bars); all three are rewritten after every
cell, so a run stopped by `--time_budget` or a timeout still leaves its finished cells.

The package: `cells` (one JAX cell: the trainer's own step, compiled and timed), `torch_ref`
(microsoft/SimMIM's step on timm's Swin, also the reference of the objective's parity test),
`report` (derived fields, timing.md, timing.png) and `runner` (the grid, its processes, the
command line). Importing it imports nothing: `python -m` sets up the allocator first.
"""
