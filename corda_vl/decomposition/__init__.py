"""Pure maths, no hooks and no modules: the covariance-oriented SVD (``cosvd``) and CorDA++'s
compactness metric and rank allocation (``compactness``). Numbers in, numbers out."""
