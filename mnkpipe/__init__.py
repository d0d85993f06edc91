"""mnkpipe: CNTK and Meta Neural Kernel Gram matrices at scale, checkpointed in Zarr, and their evaluation."""

__version__ = "0.1.0"
