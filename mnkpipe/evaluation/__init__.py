"""Meta-test evaluation on a computed Gram store: label modes, task augmentation, meta-kernel arrays (Phi) under the
results folder, MNK and its ablations, the MAML / iMAML runner, and the report."""
